"""Save and load training checkpoints: Megatron's legacy layout and megatron-core ``torch_dist``.

Atomicity: every rank writes into ``<root>/.<iter_dir>.partial``; after a barrier rank 0 renames the
folder into place and only then replaces the tracker file. A run killed during a save leaves the
previous checkpoint loadable and ``latest_checkpointed_iteration.txt`` pointing at it.

A resume restores model, optimizer (plain or distributed), LR scheduler, RNG states, the iteration
and the consumed-samples counters; ``load_weights_only`` is the "start from these weights" case.
"""
from __future__ import annotations

import argparse
import os
import re
import random
import shutil
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException

from megatron_patch.convert import layout
from megatron_patch.convert.layout import CheckpointError


def print_rank_0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)

CHECKPOINT_VERSION = 3.0
SHARDING_TYPE = "fully_reshardable"

# Globals that may appear in checkpoints written by Megatron-LM itself (its "args" Namespace).
torch.serialization.add_safe_globals([argparse.Namespace])


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _chained(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed_optimizer(optimizer) -> bool:
    return any(hasattr(o, "get_parameter_state_dp_zero") for o in _chained(optimizer))


# ---------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "random": random.getstate(),
        "np_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "np_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["random"]))
    np.random.set_state(("MT19937", state["np_keys"].numpy().astype(np.uint32), state["np_pos"],
                         0, 0.0))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------------- save


def _rank_coords():
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_data_parallel_rank())


def _ep_coords():
    """(expert-parallel rank, size, whether this rank writes its legacy rank file). With EP > 1 every
    expert-parallel rank holds other experts: the writers are the expert-data-parallel rank 0s (one
    per TP x PP x EP coordinate, Megatron-LM's rule), else the data-parallel rank 0s."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep == 1:
        return 0, 1, parallel_state.get_data_parallel_rank() == 0
    return (parallel_state.get_expert_model_parallel_rank(), ep,
            parallel_state.get_expert_data_parallel_rank() == 0)


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _finalize(root: str, partial: str, final: str, iteration: int) -> None:
    """Rename the complete ``partial`` folder into place, then point the tracker at it. An older
    folder of the same iteration (which the tracker may name) is renamed aside first and deleted
    only after the tracker is written: a kill never leaves the tracker on a half-deleted folder,
    and a kill between the two renames is undone by the next ``layout.read_tracker`` (or here)."""
    dist.barrier()
    if dist.get_rank() == 0:
        layout.restore_aside(root, iteration)  # an earlier save of it killed between its renames
        old = os.path.join(root, layout.aside_dirname(iteration))
        if os.path.isdir(old):
            shutil.rmtree(old)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(partial, final)
        layout.write_tracker(root, iteration)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def save_checkpoint(root: str, iteration: int, model: List[torch.nn.Module], optimizer, scheduler,
                    state: dict, ckpt_format: str = "legacy", args: Optional[dict] = None) -> None:
    """Collective: every rank calls it. ``state`` holds consumed-sample counters and the like."""
    name = layout.iter_dirname(iteration)
    final = os.path.join(root, name)
    partial = os.path.join(root, f".{name}.partial")
    if dist.get_rank() == 0:
        if os.path.isdir(partial):
            shutil.rmtree(partial)
        os.makedirs(partial, exist_ok=True)
    dist.barrier()
    common = {
        "iteration": iteration,
        "checkpoint_version": CHECKPOINT_VERSION,
        "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None,
        "args": args or {},
        **state,
    }
    tp_rank, pp_rank, pp_size, dp_rank = _rank_coords()
    if ckpt_format == "legacy":
        ep_rank, ep_size, writer = _ep_coords()
        sd = dict(common)
        for i, chunk in enumerate(model):
            sd[_model_key(i, len(model))] = unwrap(chunk).state_dict()
        if optimizer is not None:
            sd["optimizer"] = optimizer.state_dict()
        sd["rng_state"] = rng_state()
        rank_dir = os.path.join(partial, layout.rank_dirname(tp_rank, pp_rank, pp_size, ep_rank,
                                                             ep_size))
        if optimizer is not None and _is_distributed_optimizer(optimizer):
            # each chained optimizer (dense, experts) gathers on rank 0 of its own DP group
            states = [o.get_parameter_state_dp_zero() if hasattr(o, "get_parameter_state_dp_zero")
                      else None for o in _chained(optimizer)]
            if not writer and any(s is not None for s in states):
                raise CheckpointError(
                    f"rank {dist.get_rank()} holds distributed-optimizer state but writes no rank "
                    "file (unexpected data/expert parallel group order)")
            if writer:
                layout.atomic_torch_save(states, os.path.join(rank_dir, "distrib_optim.pt"))
        if writer:
            layout.atomic_torch_save(sd, os.path.join(rank_dir, "model_optim_rng.pt"))
    elif ckpt_format == "torch_dist":
        sharded = dict(common)
        for i, chunk in enumerate(model):
            sharded[_model_key(i, len(model))] = unwrap(chunk).sharded_state_dict()
        if optimizer is not None:
            msd = sharded["model"] if len(model) == 1 else _merge_chunks(sharded, len(model))
            sharded["optimizer"] = optimizer.sharded_state_dict(
                msd, metadata={"distrib_optim_sharding_type": SHARDING_TYPE})
        dist_checkpointing.save(sharded, partial)
        layout.atomic_torch_save(rng_state(), os.path.join(
            partial, "rng", _rng_name(dist.get_rank(), tp_rank, pp_rank)))
    else:
        raise ValueError(f"unknown checkpoint format {ckpt_format!r}")
    _finalize(root, partial, final, iteration)


def _rng_name(rank: int, tp_rank: int, pp_rank: int) -> str:
    """The name of a rank's RNG state file in a torch_dist checkpoint's ``rng`` folder."""
    return f"rank_{rank:05d}_tp{tp_rank}_pp{pp_rank}.pt"


def _rng_file(d: str, rank: int, tp_rank: int, pp_rank: int) -> Optional[str]:
    """The RNG state file of global rank ``rank`` in the torch_dist checkpoint folder ``d``: its
    own, or, when the data-parallel size changed since the save (another rank number at the same
    TP and PP ranks), the first saved rank's at the same TP and PP ranks: megatron-core seeds every
    stream but the expert-parallel one by TP and PP rank only, so data-parallel ranks hold the same
    states (``_restore_rng`` keeps the expert stream). None when no saved rank had these TP and PP
    ranks."""
    folder = os.path.join(d, "rng")
    own = os.path.join(folder, _rng_name(rank, tp_rank, pp_rank))
    if os.path.isfile(own):
        return own
    suffix = _rng_name(rank, tp_rank, pp_rank)[len(f"rank_{rank:05d}"):]
    same = sorted(f for f in os.listdir(folder)
                  if f.startswith("rank_") and f.endswith(suffix)) if os.path.isdir(folder) else []
    return os.path.join(folder, same[0]) if same else None


def _restore_rng(d: str, rank: int, tp_rank: int, pp_rank: int, dp_rank: int) -> Optional[str]:
    """Set this rank's RNG state from the torch_dist checkpoint folder ``d`` (``_rng_file``);
    from another rank's file, this rank's expert-parallel stream stays as seeded (by its
    expert-parallel rank, which data-parallel ranks differ in). Returns the file used, or None
    (with a message when the checkpoint holds RNG states, but none for these TP and PP ranks)."""
    rng_file = _rng_file(d, rank, tp_rank, pp_rank)
    if rng_file is None:
        if os.path.isdir(os.path.join(d, "rng")) and dp_rank == 0:
            print(f"> {d} holds no RNG state for TP rank {tp_rank}, PP rank {pp_rank} (saved at "
                  "another parallel layout): the RNG streams of these ranks start from the seed",
                  flush=True)
        return None
    state = layout.safe_load(rng_file)
    if os.path.basename(rng_file) != _rng_name(rank, tp_rank, pp_rank):
        name = tensor_parallel.random.get_expert_parallel_rng_tracker_name()
        mine = tensor_parallel.get_cuda_rng_tracker().get_states()
        if name in mine and name in state["tracker"]:
            state["tracker"][name] = mine[name]
    set_rng_state(state)
    return rng_file


def _merge_chunks(sharded: dict, n: int) -> dict:
    merged = {}
    for i in range(n):
        merged.update(sharded[f"model{i}"])
    return merged


# ---------------------------------------------------------------------------------------------- load


def checkpoint_format(root: str, iteration: Optional[int]) -> str:
    d = os.path.join(root, layout.iter_dirname(iteration))
    if os.path.isfile(os.path.join(d, "metadata.json")):
        return "torch_dist"
    if os.path.isdir(d):
        return "legacy"
    raise CheckpointError(f"{layout.TRACKER} in {root} points at {d}, which does not exist")


# A reward/value model started from a language model: its value head is new, the LM head unused.
HEAD_SWAP = {"missing": ("rm_head.",), "unexpected": ("output_layer.",)}


def _load_model_state(chunk, sd: dict, strict: bool = True, tolerate: Optional[dict] = None
                      ) -> None:
    try:
        missing, unexpected = unwrap(chunk).load_state_dict(sd, strict=False)
    except RuntimeError as e:  # torch lists every size mismatch: name the first few, count them
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("size mismatch")]
        if not lines:
            raise
        raise CheckpointError(f"checkpoint does not fit the model ({len(lines)} tensors of another "
                              f"shape; are the model flags those it was saved with?): "
                              + "; ".join(lines[:3])) from None
    tolerate = tolerate or {}
    missing = [k for k in missing if not k.endswith("_extra_state")
               and not k.startswith(tolerate.get("missing", ()))]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")
                  and not k.startswith(tolerate.get("unexpected", ()))]
    if strict and (missing or unexpected):
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")


def load_checkpoint(root: str, model: List[torch.nn.Module], optimizer, scheduler,
                    load_optim: bool = True, load_rng: bool = True,
                    iteration: Optional[int] = None) -> dict:
    """Full resume from ``root``'s latest checkpoint (or from ``iteration``). Returns the common
    state (iteration, ...)."""
    if iteration is None:
        iteration = layout.read_tracker(root)
    elif not os.path.isdir(os.path.join(root, layout.iter_dirname(iteration))):
        raise CheckpointError(f"{root} has no {layout.iter_dirname(iteration)}")
    fmt = checkpoint_format(root, iteration)
    d = os.path.join(root, layout.iter_dirname(iteration))
    tp_rank, pp_rank, pp_size, dp_rank = _rank_coords()
    if fmt == "legacy":
        ep_rank, ep_size, writer = _ep_coords()
        path = layout.rank_file(root, iteration, tp_rank, pp_rank, pp_size, ep_rank, ep_size)
        if not os.path.isfile(path):
            meta = layout.read_meta(root)
            raise CheckpointError(
                f"{path} is missing: the checkpoint was saved with TP={meta.get('tensor_model_parallel_size', '?')} "
                f"PP={meta.get('pipeline_model_parallel_size', '?')} "
                f"EP={meta.get('expert_model_parallel_size', 1)}; legacy checkpoints load at the "
                "same TP/PP/EP (use --ckpt-format torch_dist, or reshard with the converter)")
        sd = layout.safe_load(path)
        for i, chunk in enumerate(model):
            _load_model_state(chunk, sd[_model_key(i, len(model))])
        load_optim = load_optim and _has_optimizer_state(d, "optimizer" in sd, optimizer)
        if optimizer is not None and load_optim:
            saved_do = os.path.isfile(os.path.join(os.path.dirname(path), "distrib_optim.pt"))
            if saved_do != _is_distributed_optimizer(optimizer):
                raise _optimizer_kind_error(d, saved_do)
            optimizer.load_state_dict(sd["optimizer"])
            if _is_distributed_optimizer(optimizer):
                dpath = os.path.join(os.path.dirname(path), "distrib_optim.pt")
                states = layout.safe_load(dpath) if writer else None
                with torch.no_grad():  # fp32 main params are views of leaf parameters
                    for j, o in enumerate(_chained(optimizer)):
                        if hasattr(o, "load_parameter_state_from_dp_zero"):
                            o.load_parameter_state_from_dp_zero(states[j] if states else None)
        elif optimizer is not None:
            optimizer.reload_model_params()
        if load_rng and "rng_state" in sd:
            set_rng_state(sd["rng_state"])
        common = {k: v for k, v in sd.items()
                  if not k.startswith("model") and k not in ("optimizer", "rng_state")}
    else:
        if optimizer is not None and load_optim:
            load_optim = _has_optimizer_state(
                d, "optimizer" in dist_checkpointing.load_common_state_dict(d), optimizer)
        if optimizer is not None and load_optim:
            _check_optimizer_layout(root, d, optimizer)
            for o in _chained(optimizer):
                if hasattr(o, "_init_optimizer_states_with_dummy_values"):
                    o._init_optimizer_states_with_dummy_values()
                else:  # plain torch optimizers create their state lazily too
                    _prime(o)
        sharded = {}
        for i, chunk in enumerate(model):
            sharded[_model_key(i, len(model))] = unwrap(chunk).sharded_state_dict()
        if optimizer is not None and load_optim:
            msd = sharded["model"] if len(model) == 1 else _merge_chunks(sharded, len(model))
            sharded["optimizer"] = optimizer.sharded_state_dict(
                msd, is_loading=True, metadata={"distrib_optim_sharding_type": SHARDING_TYPE})
        try:
            loaded = dist_checkpointing.load(sharded, d)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 -- name the likely cause
            # (torch's CheckpointException is a BaseException), else re-raise it as it was
            saved_do = _saved_setting(d, "use_distributed_optimizer")
            if optimizer is not None and load_optim and saved_do is not None and \
                    bool(saved_do) != _is_distributed_optimizer(optimizer):
                raise _optimizer_kind_error(d, bool(saved_do)) from e
            if isinstance(e, (CheckpointException, CheckpointingException)):
                raise CheckpointError(f"{d} does not fit this run's model or optimizer (are the "
                                      "model flags those it was saved with?): "
                                      f"{_checkpoint_failure(e)}") from e
            raise
        for i, chunk in enumerate(model):
            _load_model_state(chunk, loaded[_model_key(i, len(model))])
        if optimizer is not None and load_optim:
            optimizer.load_state_dict(loaded["optimizer"])
        elif optimizer is not None:
            optimizer.reload_model_params()
        if load_rng:
            _restore_rng(d, dist.get_rank(), tp_rank, pp_rank, dp_rank)
        common = {k: v for k, v in loaded.items() if not k.startswith("model") and k != "optimizer"}
    if scheduler is not None and load_optim and common.get("opt_param_scheduler"):
        scheduler.load_state_dict(common["opt_param_scheduler"])
    common["iteration"] = iteration or 0
    return common


def _has_optimizer_state(d: str, has: bool, optimizer) -> bool:
    """A weights-only checkpoint (a converted ``release``, or one saved at iteration 0 before any
    step) holds no optimizer state: the optimizer starts afresh, as Megatron-LM does for release
    checkpoints, instead of a bare KeyError."""
    if not has and optimizer is not None:
        print_rank_0(f"> {d} holds no optimizer state (weights only): the optimizer starts afresh")
    return has


def _checkpoint_failure(e: BaseException) -> str:
    """The cause of a dist_checkpointing load failure in one line: megatron-core's own message, or
    the first failing rank's exception inside torch's CheckpointException (whose text is every
    rank's traceback)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (exc, _trace) = sorted(failures.items())[0]
        return f"rank {rank}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _saved_setting(d: str, name: str):
    """A training argument recorded in the torch_dist checkpoint ``d`` (None: not recorded)."""
    try:
        saved = dist_checkpointing.load_common_state_dict(d).get("args") or {}
    except Exception:  # noqa: BLE001 -- only a better error message depends on it
        return None
    return saved.get(name) if isinstance(saved, dict) else getattr(saved, name, None)


def _optimizer_kind_error(d: str, saved_distributed: bool) -> CheckpointError:
    """The optimizer state of a checkpoint saved with(out) the distributed optimizer does not load
    into the other kind (a bare KeyError inside megatron-core otherwise)."""
    return CheckpointError(
        f"{d} was saved {'with' if saved_distributed else 'without'} the distributed optimizer, "
        f"this run {'does not use it' if saved_distributed else 'uses it'} "
        "(--use-distributed-optimizer, DO in the launch scripts): resume with the setting it was "
        "saved with, or load the weights alone (--no-load-optim: a fresh optimizer state)")


def _check_optimizer_layout(root: str, d: str, optimizer) -> None:
    """megatron-core keeps expert-parallel parameters in an optimizer of their own (EP > 1), so a
    MoE run's optimizer is one or two chained optimizers, and its ``torch_dist`` keys carry a
    ``chained_<i>.`` prefix only in the second case: a checkpoint saved with one layout does not
    load into the other (a bare KeyError deep in dist_checkpointing). Say so, with the ways out."""
    keys = [k for k in dist_checkpointing.load_tensors_metadata(d) if ".state." in k]
    if not keys:
        return
    saved = len({k.split(".", 1)[0] for k in keys if k.startswith("chained_")}) or 1
    have = len(_chained(optimizer))
    if saved != have:
        meta = layout.read_meta(root)
        raise CheckpointError(
            f"{d} holds the state of {saved} chained optimizer(s) (saved at EP="
            f"{meta.get('expert_model_parallel_size', '?')}), this run has {have} (EP="
            f"{parallel_state.get_expert_model_parallel_world_size()}): megatron-core keeps "
            "expert-parallel parameters in their own optimizer only when EP > 1. Resume at EP > 1 "
            "if it was saved so (EP = 1 otherwise), or load the weights alone (--no-load-optim, "
            "or --pretrained-checkpoint in a new run)")


def _prime(opt) -> None:
    inner = getattr(opt, "optimizer", None)
    if inner is None:
        return
    for group in inner.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    inner.step()
    inner.zero_grad()


def _legacy_tp_size(d: str) -> int:
    """Tensor-parallel ranks of the legacy checkpoint in ``d`` (0 when it has none)."""
    ranks = {m.group(1) for n in os.listdir(d) for m in [re.match(r"mp_rank_(\d+)", n)] if m}
    return len(ranks)


def resharded_copy(ckpt: str, tp: int, pp: int, ep: int = 1, log=print_rank_0) -> str:
    """Rank 0 reshards ``ckpt`` (legacy or torch_dist) to TP/PP/EP into a temporary folder, removed
    at exit, with the conversion engine; every rank gets its path."""
    import atexit
    import tempfile

    from megatron_patch.convert import engine

    box = [None]
    if dist.get_rank() == 0:
        tmp = tempfile.mkdtemp(prefix="mp_reshard_")
        atexit.register(shutil.rmtree, tmp, True)
        box = [os.path.join(tmp, "ckpt")]
        log(f"> {ckpt} is not at TP={tp} PP={pp}{f' EP={ep}' if ep > 1 else ''}: "
            f"resharding a copy into {box[0]}")
        engine.reshard(ckpt, box[0], tp=tp, pp=pp, ep=ep, log=lambda *a: None)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _legacy_pp_size(d: str, tp_rank: int) -> Optional[int]:
    """How many pipeline stages the legacy checkpoint in ``d`` has for ``tp_rank`` (None: none)."""
    if os.path.isfile(os.path.join(d, layout.rank_dirname(tp_rank, 0, 1), "model_optim_rng.pt")):
        return 1
    n = 0
    while os.path.isfile(os.path.join(d, layout.rank_dirname(tp_rank, n, 2), "model_optim_rng.pt")):
        n += 1
    return n or None


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _legacy_global_state(d: str, tp_rank: int, pp: int):
    """Every layer of one tensor-parallel rank keyed by global layer index, plus the other weights.
    Stage ``r``'s chunk ``c`` of ``v`` holds global layers ``(c * pp + r) * n ...``, megatron-core's
    interleaved order (v = 1: stage after stage)."""
    layers, rest = {}, {}
    for r in range(pp):
        sd = layout.safe_load(os.path.join(d, layout.rank_dirname(tp_rank, r, pp), "model_optim_rng.pt"))
        keys = ["model"] if "model" in sd else sorted(
            (k for k in sd if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
        for c, key in enumerate(keys):
            local = {}
            for name, t in sd[key].items():
                m = _LAYER.match(name)
                if m:
                    local.setdefault(int(m.group(1)), {})[m.group(2)] = t
                else:
                    rest.setdefault(name, t)
            n = len(local)
            for i, params in local.items():
                layers[(c * pp + r) * n + i] = params
    return layers, rest


def _chunk_state(gpt, layers: dict, rest: dict) -> dict:
    """The state dict of one model chunk, its layers taken by their global ``layer_number``."""
    sd = {}
    for name in gpt.state_dict():
        m = _LAYER.match(name)
        if m:
            g = gpt.decoder.layers[int(m.group(1))].layer_number - 1
            if g in layers and m.group(2) in layers[g]:
                sd[name] = layers[g][m.group(2)]
        elif name in rest:
            sd[name] = rest[name]
        elif name == "output_layer.weight" and "embedding.word_embeddings.weight" in rest:
            sd[name] = rest["embedding.word_embeddings.weight"]  # tied: the last stage's copy
    return sd


def load_weights_only(path: str, model: List[torch.nn.Module], tolerate: Optional[dict] = None
                      ) -> None:
    """Load the model weights of ``path``'s latest (or release) checkpoint; nothing else.
    ``tolerate``: key prefixes that may be ``missing`` from the checkpoint or ``unexpected`` in it
    (``HEAD_SWAP`` starts a reward model from a language model)."""
    iteration = layout.read_tracker(path)
    fmt = checkpoint_format(path, iteration)
    d = os.path.join(path, layout.iter_dirname(iteration))
    tp_rank, pp_rank, pp_size, _ = _rank_coords()
    if fmt == "legacy":
        ckpt_tp = _legacy_tp_size(d)
        run_tp = parallel_state.get_tensor_model_parallel_world_size()
        meta = layout.read_meta(path)
        ckpt_ep = int(meta.get("expert_model_parallel_size") or 1)
        ep_rank, run_ep, _ = _ep_coords()
        if (ckpt_tp and ckpt_tp != run_tp) or ckpt_ep != run_ep or \
                (run_ep > 1 and int(meta.get("pipeline_model_parallel_size") or 1) != pp_size):
            # another TP or EP layout (or PP, with experts split): a resharded copy (conversion
            # engine)
            target = resharded_copy(path, run_tp, pp_size, run_ep)
            return load_weights_only(target, model, tolerate)
        if run_ep > 1:  # this rank's own file: the same TP, PP and EP
            sd = layout.safe_load(layout.rank_file(path, iteration, tp_rank, pp_rank, pp_size,
                                                   ep_rank, run_ep))
            for i, chunk in enumerate(model):
                _load_model_state(chunk, sd[_model_key(i, len(model))], tolerate=tolerate)
            return
        ckpt_pp = _legacy_pp_size(d, tp_rank)
        f = os.path.join(d, layout.rank_dirname(tp_rank, pp_rank, pp_size), "model_optim_rng.pt")
        if ckpt_pp is None:
            meta = layout.read_meta(path)
            raise CheckpointError(
                f"{f} is missing: {path} was written for TP={meta.get('tensor_model_parallel_size', '?')} "
                f"PP={meta.get('pipeline_model_parallel_size', '?')}, this run uses "
                f"TP={parallel_state.get_tensor_model_parallel_world_size()} PP={pp_size}; "
                "convert it to this tensor-parallel size first")
        if ckpt_pp == pp_size:
            sd = layout.safe_load(f)
            if all(_model_key(i, len(model)) in sd for i in range(len(model))):
                for i, chunk in enumerate(model):
                    _load_model_state(chunk, sd[_model_key(i, len(model))], tolerate=tolerate)
                return
        # another pipeline layout (PP size or virtual stages): regroup by global layer number
        layers, rest = _legacy_global_state(d, tp_rank, ckpt_pp)
        for chunk in model:
            _load_model_state(chunk, _chunk_state(unwrap(chunk), layers, rest), tolerate=tolerate)
    else:
        sharded = {_model_key(i, len(model)): unwrap(c).sharded_state_dict()
                   for i, c in enumerate(model)}
        if tolerate and tolerate.get("missing"):  # ask only for what the checkpoint holds
            have = set(dist_checkpointing.load_tensors_metadata(d))
            for key, sd in sharded.items():
                for name in [n for n in sd if n.startswith(tolerate["missing"])]:
                    if getattr(sd[name], "key", name) not in have:
                        del sd[name]
        loaded = dist_checkpointing.load(sharded, d)
        for i, chunk in enumerate(model):
            _load_model_state(chunk, loaded[_model_key(i, len(model))], tolerate=tolerate)
