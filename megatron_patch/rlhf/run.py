"""PPO / GRPO from a ChatLearn-style YAML folder: ``python -m megatron_patch.rlhf.run RLHF_YAML``.

Under torchrun (``examples/rlhf/run_rlhf.sh`` starts it) every process runs every role
(``megatron_patch.rlhf.trainer``). Roles of the YAML -> trainer roles:

    ppo_policy   -> policy     (trained; from its ``load``, the SFT checkpoint)
    policy       -> the policy itself (its inference twin): only its RLHF generation keys are
                    read; in another TP/PP layout a second copy generates and receives the trained
                    weights after every episode
    reference    -> reference  (frozen; from its ``load``, the SFT checkpoint)
    reward_ref   -> reward     (frozen reward model; from its ``load``, the RM checkpoint)
    reward_train -> value      (trained, PPO only; from its ``load``, the RM checkpoint or any LM)
    reward_forward -> the value model itself (its inference twin); in another layout a second
                    copy computes the values, likewise

Settings: ``trainer.ppo_config_from`` (the ``rlhf:`` section and the per-model RLHF keys). Prompts:
``rlhf.data_path``. Outputs under ``rlhf.output_dir``: ``rlhf_state.json`` (episode, consumed
prompts, KL controller), the trainable roles' checkpoints (their ``save``, default
``ppo_policy`` / ``ppo_value``), ``log/metrics.jsonl`` (one record per episode) and
``tensorboard/`` (unless the ppo_policy file sets ``log_dir`` / ``tensorboard_dir``). Rerunning
the same command resumes from ``rlhf_state.json``.

Everything that can be checked before a model is built is (``prepare``): the YAML schema, the
process count against every role's ``num_device``, each role's TP/PP layout (dividing the job), the checkpoints (and
``load_iteration``), the prompt files, the reward function (imported and called once on a probe).
Any error is one ``error: ...`` line (rank 0) and exit code 2. ``--check`` stops there and prints
the output folder (the launch script's pre-flight).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Callable, Dict, List, Optional

from megatron_patch.rlhf.config import RLHFConfig, RLHFConfigError, RoleConfig, load_config

ROLE_ARGS = {"ppo_policy": "policy", "reference": "reference", "reward_ref": "reward",
             "reward_train": "value"}
TWINS = {"policy": "ppo_policy", "reward_forward": "reward_train"}
DEFAULT_SAVE = {"ppo_policy": "ppo_policy", "reward_train": "ppo_value"}
# Megatron keys of the per-model files that the trainer sets itself (a warning when a file sets one)
SET_BY_TRAINER = {
    "micro_batch_size": "rlhf.train_micro_batch_size",
    "global_batch_size": "rlhf.train_global_batch_size",
    "train_iters": "the episodes and batch sizes", "epochs": "the episodes and batch sizes",
    "train_tokens": "the episodes and batch sizes", "train_samples": "the episodes and batch sizes",
    "lr_decay_iters": "all the optimizer steps of the run",
    "lr_decay_samples": "all the optimizer steps of the run",
    "save_interval": "rlhf.save_episode_interval", "exit_interval": "rlhf.num_ppo_episode",
    "log_interval": "every episode", "eval_interval": "no evaluation",
    "eval_iters": "no evaluation", "eval_only": "no evaluation", "train_data": "rlhf.data_path",
    "valid_data": "rlhf.data_path", "data_path": "rlhf.data_path", "mock_data": "rlhf.data_path",
    "task": "the role", "packing": "no packing", "reward_margin": "no reward-model loss"}


@dataclasses.dataclass
class Plan:
    """What ``prepare`` found: the trainer's settings and role arguments, the prompt files and the
    output folders."""
    config: RLHFConfig
    ppo: object  # trainer.PPOConfig
    args: Dict[str, argparse.Namespace]  # trainer role (policy, reference, reward, value) -> args
    offload: Dict[str, str]  # trainer role -> "weights" / "all" (free_memory, offload_weights)
    prompts: List[str]
    eval_prompts: Optional[List[str]]  # held-out prompt files (rlhf.eval_data_path) or None
    root: str
    log_dir: str
    tensorboard_dir: str
    views: List[str] = dataclasses.field(default_factory=list)  # temporary folders (load_iteration)

    def cleanup(self) -> None:
        for v in self.views:
            shutil.rmtree(v, ignore_errors=True)


def _err(role: RoleConfig, msg: str) -> RLHFConfigError:
    return RLHFConfigError(f"{role.model_config_file} (role {role.name}): {msg}")


def _checkpoint(role: RoleConfig, args: argparse.Namespace, views: List[str]) -> None:
    """args.load: the role's checkpoint folder, at ``load_iteration`` when that is set (a temporary
    folder of links whose tracker names that iteration)."""
    from megatron_patch.convert import layout

    src = next((p for p in (args.load, args.pretrained_checkpoint) if layout.has_checkpoint(p)),
               None)
    if src is None:
        given = " / ".join(f"{k} {v}" for k, v in (("load", args.load), ("pretrained_checkpoint",
                                                     args.pretrained_checkpoint)) if v)
        raise _err(role, f"{given} is not a checkpoint folder (no {layout.TRACKER})" if given
                   else "load is not set (the checkpoint this role starts from)")
    src = os.path.abspath(src)
    it = role.rlhf_values()["load_iteration"]
    args.load, args.pretrained_checkpoint = src, None
    if it is None:
        return
    try:
        latest = layout.read_tracker(src)
    except layout.CheckpointError as e:
        raise _err(role, str(e)) from None
    if latest == it:
        return
    if not os.path.isdir(os.path.join(src, layout.iter_dirname(it))):
        have = sorted(d for d in os.listdir(src) if d.startswith("iter_") or d == "release")
        raise _err(role, f"load_iteration {it}: {src} has no {layout.iter_dirname(it)} "
                         f"(it has {', '.join(have) or 'no iterations'})")
    view = tempfile.mkdtemp(prefix=f"rlhf-{role.name}-iter{it}-")
    views.append(view)
    for name in os.listdir(src):
        if name != layout.TRACKER:
            os.symlink(os.path.join(src, name), os.path.join(view, name))
    layout.write_tracker(view, it)
    args.load = view


def _probe_reward_function(spec: str, where: str) -> None:
    import importlib

    mod, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except Exception as e:  # noqa: BLE001 -- ImportError, AttributeError, or the module's own error
        raise RLHFConfigError(f"{where}: reward_function {spec} cannot be imported: "
                              f"{type(e).__name__}: {e}") from None
    call = "fn(['probe'], ['probe'], response_ids=[[1]])"
    try:
        out = fn(["probe"], ["probe"], response_ids=[[1]])
    except Exception as e:  # noqa: BLE001 -- the user's function: any failure is reported
        raise RLHFConfigError(f"{where}: reward_function {spec} raised {type(e).__name__}: {e} "
                              f"on a probe call {call}") from None
    try:
        ok = len(out) == 1 and [float(x) for x in out]
    except (TypeError, ValueError):  # no len, or not numbers (float('high'), float(None))
        ok = False
    if not ok:
        raise RLHFConfigError(f"{where}: reward_function {spec} returned {out!r} on a probe call "
                              f"{call}; it must return one number per response")


def prepare(path: str, world_size: int, warn: Callable[[str], None],
            env: Optional[Dict[str, str]] = None) -> Plan:
    """Load and check the configuration (RLHFConfigError, one line) without building anything."""
    from megatron_patch.rlhf import trainer as T
    from megatron_patch.training.arguments import ArgumentError

    cfg = load_config(path, env)
    ppo = T.ppo_config_from(cfg, warn)
    try:
        T.check_config(ppo)
    except ArgumentError as e:
        raise RLHFConfigError(f"{cfg.path}: {e}") from None
    models, where = cfg.models, cfg.path
    for r in models.values():
        if r.gpu_per_process != 1:
            raise RLHFConfigError(f"{where}: models.{r.name}.gpu_per_process is "
                                  f"{r.gpu_per_process}: one process drives one device here")
        if r.num_device != world_size:
            raise RLHFConfigError(
                f"{where}: models.{r.name}.num_device is {r.num_device} but this job has "
                f"{world_size} process(es): every role runs on every process (all colocated); "
                f"give every role num_device {world_size} (NUM_DEVICE={world_size} with the "
                "example configs)")
    col = cfg.rlhf.colocation
    if not (len(col) == 1 and set(col[0]) == set(models)):
        warn(f"{where}: rlhf.colocation {cfg.rlhf.colocation}: all roles share all the devices "
             "of this job (one colocation group)")
    used = [n for n in ROLE_ARGS if n in models and not (n == "reward_train" and
                                                         ppo.algorithm == "grpo")]
    if ppo.algorithm == "grpo":
        for n in ("reward_train", "reward_forward"):
            if n in models:
                warn(f"{where}: models.{n} is not used with grpo (no value model)")
    args = {n: models[n].megatron_args() for n in used}
    twins = {n: models[n].megatron_args() for n in TWINS if n in models}
    def shape(a) -> str:
        vpp = a.virtual_pipeline_model_parallel_size or a.num_layers_per_virtual_pipeline_stage
        return f"TP={a.tensor_model_parallel_size} PP={a.pipeline_model_parallel_size}" + (
            f" (virtual pipeline {T.layout_of(a)[2:]})" if vpp else "")

    for n, a in list(args.items()) + list(twins.items()):
        size = a.tensor_model_parallel_size * a.pipeline_model_parallel_size
        if world_size % size:
            raise _err(models[n], f"{shape(a)} does not divide the {world_size} process(es) of "
                                  "this job (every role runs on all of them, in world / (TP x PP) "
                                  "data-parallel replicas)")
    try:  # the trainer's own check, before any model is built
        T.check_batch_split(ppo, {**{ROLE_ARGS[n]: a for n, a in args.items()},
                                  "generation": twins.get("policy"),
                                  "value_forward": twins.get("reward_forward")
                                  if "reward_train" in args else None}, world_size)
    except ArgumentError as e:
        raise RLHFConfigError(f"{where}: rlhf: {e}") from None
    for twin, of in TWINS.items():
        if twin in twins and of in args and twins[twin].load != args[of].load:
            warn(f"{models[twin].model_config_file}: load {twins[twin].load} is not read: the "
                 f"{twin} role is {of} itself (load {args[of].load})")
    for n in used:
        for k in [k for k in SET_BY_TRAINER if k in models[n].values]:
            warn(f"{models[n].model_config_file}: {k} has no effect here (the trainer uses "
                 f"{SET_BY_TRAINER[k]})")
        if "finetune" in models[n].values and not args[n].finetune:
            warn(f"{models[n].model_config_file}: finetune: false has no effect: load is read "
                 "weights-only; a run resumes from rlhf.output_dir")
    root = cfg.rlhf.output_dir
    if not root:
        raise RLHFConfigError(f"{where}: rlhf.output_dir is not set (where the checkpoints, "
                              "metrics and logs go)")
    root = os.path.abspath(root)
    for n, sub in DEFAULT_SAVE.items():
        if n in args:
            args[n].save = os.path.abspath(args[n].save or os.path.join(root, sub))
    if not cfg.rlhf.data_path:
        raise RLHFConfigError(f"{where}: rlhf.data_path is not set (the prompt files)")
    from megatron_patch.data.text_io import list_input_files

    try:
        prompts = list_input_files(cfg.rlhf.data_path, (".json", ".jsonl", ".json.zst",
                                                        ".jsonl.zst"))
    except FileNotFoundError as e:
        raise RLHFConfigError(f"{where}: rlhf.data_path: {e}") from None
    eval_prompts = None
    if cfg.rlhf.eval_data_path:
        try:
            eval_prompts = list_input_files(cfg.rlhf.eval_data_path,
                                            (".json", ".jsonl", ".json.zst", ".jsonl.zst"))
        except FileNotFoundError as e:
            raise RLHFConfigError(f"{where}: rlhf.eval_data_path: {e}") from None
    if ppo.reward_function:
        setter = next(r for r in models.values() if r.rlhf_values()["reward_function"])
        _probe_reward_function(ppo.reward_function, setter.model_config_file)
    views: List[str] = []
    try:
        for n in used:
            _checkpoint(models[n], args[n], views)
    except BaseException:
        for v in views:
            shutil.rmtree(v, ignore_errors=True)
        raise
    pa = args["ppo_policy"]
    trainer_args = {ROLE_ARGS[n]: a for n, a in args.items()}
    if "policy" in twins and T.layout_of(twins["policy"]) != T.layout_of(pa):
        # the policy's inference twin in a layout of its own: it starts from the trained
        # policy's weights and receives them resharded after every episode
        generation = argparse.Namespace(**vars(twins["policy"]))
        generation.load, generation.pretrained_checkpoint = pa.load, pa.pretrained_checkpoint
        trainer_args["generation"] = generation
    if "reward_forward" in twins and "reward_train" in args and \
            T.layout_of(twins["reward_forward"]) != T.layout_of(args["reward_train"]):
        # the value model's inference twin in a layout of its own: likewise, from the value model
        trainer_args["value_forward"] = argparse.Namespace(**vars(twins["reward_forward"]))
    # per-model offloading (ChatLearn's free_memory / offload_weights) -> trainer roles; a twin
    # that is its trained role itself adds its setting to that role's
    where_to = dict(ROLE_ARGS, policy="generation" if "generation" in trainer_args else "policy",
                    reward_forward="value_forward" if "value_forward" in trainer_args else "value")
    offload: Dict[str, str] = {}
    for n, r in models.items():
        kind = "all" if r.free_memory else "weights" if r.offload_weights else None
        target = where_to.get(n)
        if kind and target in trainer_args:  # (no value roles with grpo)
            offload[target] = "all" if "all" in (kind, offload.get(target)) else kind
    return Plan(cfg, ppo, trainer_args, offload, prompts, eval_prompts, root,
                os.path.abspath(pa.log_dir or os.path.join(root, "log")),
                os.path.abspath(pa.tensorboard_dir or os.path.join(root, "tensorboard")), views)


def build_cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_patch.rlhf.run",
                                description="PPO / GRPO from an RLHF YAML (docs/rlhf.md)")
    p.add_argument("config", help="the main YAML (e.g. examples/rlhf/configs/llama2/rlhf.yaml)")
    p.add_argument("--check", action="store_true",
                   help="check everything that can be checked before a model is built, print "
                        "the output folder and exit")
    p.add_argument("--world-size", type=int, default=None,
                   help="the job's process count (default: WORLD_SIZE, else 1)")
    return p


def main(argv: Optional[list] = None) -> int:
    cli = build_cli().parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    world = cli.world_size or int(os.environ.get("WORLD_SIZE", "1"))

    def say(msg: str) -> None:
        if rank0:
            print(msg, file=sys.stderr, flush=True)

    try:
        plan = prepare(cli.config, world, lambda m: say(f"warning: {m}"))
    except RLHFConfigError as e:
        if os.environ.get("MEGATRON_PATCH_DEBUG"):
            raise
        say(f"error: {e}")
        return 2
    if cli.check:
        plan.cleanup()
        if rank0:
            print(plan.root, flush=True)
        return 0

    from megatron_patch.cli import run_entry
    from megatron_patch.rlhf import trainer as T

    a = plan.args

    def body():
        T.run(plan.ppo, a["policy"], a.get("reward"), a.get("value"), plan.prompts, plan.root,
              plan.log_dir, plan.tensorboard_dir, reference_args=a["reference"],
              eval_prompts=plan.eval_prompts, generation_args=a.get("generation"),
              value_forward_args=a.get("value_forward"), offload_roles=plan.offload)
    return run_entry(body, cleanup=plan.cleanup)


if __name__ == "__main__":
    sys.exit(main())
