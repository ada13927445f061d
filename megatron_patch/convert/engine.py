"""The conversion engine: HF -> Megatron, Megatron -> HF and Megatron -> Megatron (resharding), all
driven by a family's mapping table (``megatron_patch.convert.mapping``) and the sharding rules
(``megatron_patch.convert.rules``).

How it streams:
- HF -> Megatron writes one rank file (TP x PP x EP) at a time; for each it walks that stage's rows,
  reads the HF tensors of one row (lazily, from mmap'ed files), applies the rule and keeps only this
  rank's shard. Peak memory: the HF tensors of one row plus one rank file.
- Megatron -> HF memory-maps every rank file, walks the rows in HF order, gathers one row's shards,
  applies the reverse rule and adds the result to the current output shard (flushed at
  ``max_shard_bytes``). Peak memory: one row plus one output shard.
- Resharding reads like Megatron -> HF and writes like HF -> Megatron, with the HF-named tensors in
  between living only one row at a time.

Every conversion checks names before writing anything (HF tensors the table needs but the checkpoint
lacks, and left-over ones, are errors that list them), writes into a temporary folder beside the
target and renames it at the end: a failure leaves nothing half-written at the target.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_patch.convert import hf_io, layout, mg_io
from megatron_patch.convert.mapping import Bound, Row, bind
from megatron_patch.convert.rules import ConversionError, ShardCtx, compact

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HF_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
REWARD_HEADS = ("score.weight", "v_head.weight")


def _dtype(d) -> Optional[torch.dtype]:
    if d is None or isinstance(d, torch.dtype):
        return d
    try:
        return DTYPES[str(d).lower()]
    except KeyError:
        raise ConversionError(f"unknown dtype {d!r}; use fp32, fp16 or bf16") from None


# ----------------------------------------------------------------------------------------- helpers

def family_and_arch(hf_config: dict, family: Optional[str] = None):
    from megatron_patch.models.registry import family_for_hf_config, get_family

    try:
        fam = get_family(family) if family else family_for_hf_config(hf_config)
    except (KeyError, ValueError) as e:
        raise ConversionError(str(e).strip('"')) from None
    if fam.mapping is None:
        raise ConversionError(f"family {fam.name} has no weight mapping table")
    try:
        return fam, fam.config_table.to_megatron(hf_config)
    except ConversionError:
        raise
    except (KeyError, ValueError, TypeError, NotImplementedError) as e:
        # a config this family's table cannot take (an unsupported option, a missing field)
        what = str(e.args[0] if e.args else e).strip('"')
        if isinstance(e, KeyError) and " " not in what:
            what = f"missing field {what!r}"
        raise ConversionError(f"{fam.name} config.json: {what}") from None


def num_experts(arch) -> int:
    return int(arch.config.get("num_moe_experts") or 0)


def shard_ctx(arch, tp: int, vocab_size: int, padded_vocab_size: int) -> ShardCtx:
    c = arch.config
    heads = c["num_attention_heads"]
    return ShardCtx(tp=tp, num_heads=heads, num_groups=c.get("num_query_groups") or heads,
                    head_dim=c.get("kv_channels") or c["hidden_size"] // heads,
                    vocab_size=vocab_size, padded_vocab_size=padded_vocab_size)


def check_layout(arch, tp: int, pp: int, ep: int) -> None:
    """Fail before anything is written on layouts the model cannot take."""
    from megatron_patch.models.builder import check_parallel

    for name, v in (("tensor", tp), ("pipeline", pp), ("expert", ep)):
        if int(v) < 1:
            raise ConversionError(f"{name} parallel size must be >= 1, got {v}")
    try:
        check_parallel(arch, tp, pp)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    e = num_experts(arch)
    if ep > 1 and not e:
        raise ConversionError(f"expert parallel size {ep} given for a model without experts")
    if e and e % ep:
        raise ConversionError(f"expert parallel size {ep} does not divide the {e} experts")


def reward_rows(arch, head: str) -> List[Row]:
    from megatron_patch.convert.rules import REPLICATED

    rows = [Row(head, "rm_head.weight", REPLICATED)]
    if arch.extra.get("reward_head_bias"):
        rows.append(Row(head.replace(".weight", ".bias"), "rm_head.bias", REPLICATED))
    return rows


def model_rows(fam, arch, reward: bool, head: str = "score.weight") -> List[Row]:
    rows = fam.mapping.rows(arch)
    if reward:  # a value head instead of the LM head
        rows = [r for r in rows if r.mg != "output_layer.weight"] + reward_rows(arch, head)
    return rows


def global_units(rows: Sequence[Row], num_layers: int, n_experts: int) -> List[Bound]:
    """Every row bound with global layer/expert indices, in HF order (embedding, layers, head)."""
    first = [bind(r) for r in rows if r.stage() == "first"]
    last = [bind(r) for r in rows if r.stage() == "last"]
    layers = []
    for i in range(num_layers):
        for r in rows:
            if not r.per_layer:
                continue
            if r.per_expert:
                layers += [bind(r, i, i, e, e) for e in range(n_experts)]
            else:
                layers.append(bind(r, i, i))
    return first + layers + last


def stage_units(rows: Sequence[Row], arch, num_layers: int, pp: int, pp_rank: int, ep: int,
                ep_rank: int, tied: bool) -> List[Bound]:
    """The rows of one (PP, EP) rank, bound with stage-local layers and EP-local experts."""
    per_stage = num_layers // pp
    n_exp = num_experts(arch)
    per_ep = n_exp // ep if n_exp else 0
    out: List[Bound] = []
    if pp_rank == 0:
        out += [bind(r) for r in rows if r.stage() == "first"]
    for local in range(per_stage):
        i = pp_rank * per_stage + local
        for r in rows:
            if not r.per_layer:
                continue
            if r.per_expert:
                out += [bind(r, i, local, ep_rank * per_ep + le, le) for le in range(per_ep)]
            else:
                out.append(bind(r, i, local))
    if pp_rank == pp - 1:
        out += [bind(r) for r in rows if r.stage() == "last"]
        if tied and pp > 1:  # the last stage holds its own copy of the shared embedding
            emb = [r for r in rows if r.mg == "embedding.word_embeddings.weight"]
            if emb:
                b = bind(emb[0])
                out.append(Bound(b.row, b.hf, "output_layer.weight"))
    return out


def check_side_files(paths: Sequence[str]) -> List[str]:
    """``paths`` as readable files to copy into a conversion's target: a folder stands for the
    tokenizer files it holds (``hf_io.TOKENIZER_FILES``); a missing path, or a folder without any
    of them, is a ConversionError (a mistyped tokenizer path is not left out silently)."""
    out: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = [os.path.join(p, n) for n in hf_io.TOKENIZER_FILES
                     if os.path.isfile(os.path.join(p, n))]
            if not found:
                raise ConversionError(f"tokenizer folder {p} holds none of "
                                      f"{', '.join(hf_io.TOKENIZER_FILES)}")
            out.extend(found)
        elif os.path.isfile(p):
            if not os.access(p, os.R_OK):
                raise ConversionError(f"tokenizer file {p} is not readable")
            out.append(p)
        else:
            raise ConversionError(f"tokenizer {p} does not exist")
    return out


@contextlib.contextmanager
def staging(target: str, overwrite: bool = False, sources: Sequence[str] = (),
            side_files: Sequence[str] = ()) -> Iterator[str]:
    """A temporary folder beside ``target`` that becomes ``target`` only if the block succeeds.
    ``target`` may not be, hold or sit inside any of ``sources`` (an overwrite would delete the
    source; a target inside it would add to it), checked before anything is written.
    ``side_files``: more files (e.g. a tokenizer given apart from the checkpoint) copied in by
    name after the block, before the rename: the target holds them from its first moment."""
    side_files = check_side_files(side_files)
    if not str(target).strip():
        raise ConversionError("the target folder is empty")
    target = os.path.realpath(target)
    for src in sources:
        src = os.path.realpath(src)
        if target == src or target.startswith(src + os.sep) or src.startswith(target + os.sep):
            how = "is" if target == src else "is inside" if target.startswith(src) else "holds"
            raise ConversionError(f"target {target} {how} the source {src}: sources are never "
                                  "modified; choose another target folder")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(target):
        if not os.path.isdir(target):
            raise ConversionError(f"target {target} exists and is not a folder")
        if os.listdir(target) and not overwrite:
            raise ConversionError(f"target {target} exists and is not empty (pass overwrite=True / "
                                  "--overwrite to replace it)")
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.partial-")
    try:
        yield tmp
        for f in side_files:
            shutil.copy2(f, os.path.join(tmp, os.path.basename(f)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(target):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.old-")
        os.rmdir(old)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


# ----------------------------------------------------------------------------------------- sources

class HFSource:
    """HF-named tensors from an HF checkpoint folder (optionally with a renamed key prefix)."""

    def __init__(self, reader: hf_io.HFReader, rename: Optional[Tuple[str, str]] = None):
        self.reader = reader
        self.rename = rename  # (prefix in the file, prefix the mapping uses)

    def _file_name(self, name: str) -> str:
        if self.rename and name.startswith(self.rename[1]):
            return self.rename[0] + name[len(self.rename[1]):]
        return name

    def names(self) -> List[str]:
        out = []
        for n in self.reader.names():
            if self.rename and n.startswith(self.rename[0]) and not (
                    n.startswith("lm_head.") or (self.rename[0] == "" and
                                                 n.startswith(self.rename[1]))):
                n = self.rename[1] + n[len(self.rename[0]):]
            out.append(n)
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.reader.get(self._file_name(name))

    def info(self, name: str):
        return self.reader.info(self._file_name(name))


class MegatronSource:
    """HF-named tensors computed from a Megatron checkpoint through the reverse rules; keeps only the
    outputs of the row computed last."""

    def __init__(self, reader: mg_io.MegatronReader, units: Sequence[Bound], ctx: ShardCtx):
        self.reader = reader
        self.ctx = ShardCtx(**{**ctx.__dict__, "tp": reader.tp})
        self.by_hf: Dict[str, Bound] = {}
        for u in units:
            for n in u.hf:
                self.by_hf[n] = u
        self._cache: Dict[str, torch.Tensor] = {}

    def names(self) -> List[str]:
        return list(self.by_hf)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            u = self.by_hf.get(name)
            if u is None:
                raise ConversionError(f"no mapping row produces HF tensor {name}")
            outs = u.rule.to_hf(self.reader.shards(u.mg), self.ctx)
            self._cache = dict(zip(u.hf, outs))
        return self._cache[name]


# ----------------------------------------------------------------------------------------- writers

def write_megatron(get: Callable[[str], torch.Tensor], rows: Sequence[Row], arch, root: str, *,
                   tp: int, pp: int, ep: int, ctx: ShardCtx, dtype: Optional[torch.dtype],
                   iteration: Optional[int] = None, log: Callable = print) -> None:
    tied = bool(arch.model.get("share_embeddings_and_output_weights"))
    L = arch.config["num_layers"]
    for p in range(pp):
        for e in range(ep):
            units = stage_units(rows, arch, L, pp, p, ep, e, tied)
            for t in range(tp):
                sd: Dict[str, torch.Tensor] = {}
                for u in units:
                    shards = u.rule.to_mg([get(n) for n in u.hf], ctx)
                    sd[u.mg] = compact(shards[t], dtype if shards[t].is_floating_point() else None)
                    del shards
                mg_io.save_rank(mg_io.rank_path(root, iteration, t, p, pp, e, ep), sd)
                del sd
    layout.write_tracker(root, iteration)


def _check_names(needed: Sequence[str], available: Sequence[str], ignorable: Callable[[str], bool],
                 where: str) -> None:
    avail = set(available)
    missing = [n for n in needed if n not in avail]
    if missing:
        raise ConversionError(f"{where} lacks {len(missing)} tensor(s) the mapping needs: "
                              + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    need = set(needed)
    left = sorted(n for n in avail if n not in need and not ignorable(n))
    if left:
        raise ConversionError(f"{where} has {len(left)} tensor(s) no mapping row uses: "
                              + ", ".join(left[:20]) + (" ..." if len(left) > 20 else ""))


def detect_reward(hf_config: dict, names: Sequence[str]) -> Optional[Tuple[str, Optional[Tuple[str, str]]]]:
    """(head tensor name, key-prefix rename) when the HF checkpoint is a reward model, else None.

    ``*ForSequenceClassification`` models carry a ``score`` head; DeepSpeed-Chat / trlx reward
    models a ``v_head`` over a base model whose keys may carry another prefix."""
    archs = hf_config.get("architectures") or []
    names = set(names)
    if any(a.endswith("ForSequenceClassification") for a in archs) and "score.weight" in names:
        return "score.weight", None
    if "v_head.weight" in names:
        for prefix in ("rwtranformer.", "rwtransformer.", "base_model.model.", "base_model.",
                       "transformer.", "model."):
            if any(n.startswith(prefix) for n in names):
                return "v_head.weight", prefix
        return "v_head.weight", None
    return None


def _reward_rename(fam, arch, prefix: Optional[str], names: Sequence[str]) -> Optional[Tuple[str, str]]:
    """Map a reward model's base-model key prefix onto the one the causal-LM mapping uses."""
    if prefix is None:
        return None
    rows = fam.mapping.rows(arch)
    mapped = {n.split(".")[0] + "." for r in rows for n in r.hf}
    if prefix in mapped:
        return None
    target = sorted(mapped - {"lm_head."})[0]  # "model." / "transformer."
    # DeepSpeed-Chat wraps the bare base model (e.g. LlamaModel) as "rwtranformer.": its keys lack
    # the "model." level, so the prefix maps onto the mapping's own
    return prefix, target


def _base_prefix_rename(fam, arch, names: Sequence[str]) -> Optional[Tuple[str, str]]:
    """Checkpoints saved from the bare base model (the published bigscience/bloom-* and
    facebook/opt-* / galactica files: ``h.0...``, ``decoder.layers.0...``) lack the
    ``transformer.`` / ``model.`` level the mapping names; ``transformers`` adds it on load, and
    so does this (``("", prefix)``). None when the names already carry it."""
    mapped = {n.split(".")[0] + "." for r in fam.mapping.rows(arch) for n in r.hf} - {"lm_head."}
    if len(mapped) != 1:
        return None
    prefix = next(iter(mapped))
    body = [n for n in names if not n.startswith("lm_head.")]
    if not body or any(n.startswith(prefix) for n in body):
        return None
    return "", prefix


def _meta(fam, arch, hf_config, tp, pp, ep, padded, orig_vocab, hf_vocab, extra, divisible_by,
          reward: bool, dtype_name: str, **more) -> dict:
    m = {
        "family": fam.name, "format": "legacy", "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp, "expert_model_parallel_size": ep,
        "padded_vocab_size": padded, "original_vocab_size": orig_vocab, "hf_vocab_size": hf_vocab,
        "extra_vocab_size": extra, "make_vocab_size_divisible_by": divisible_by,
        "reward_model": reward, "num_layers": arch.config["num_layers"], "params_dtype": dtype_name,
        "hf_config": hf_config,
    }
    m.update(more)
    return m


def _first_float_dtype(source: HFSource, units) -> torch.dtype:
    for u in units:
        _, is_float, dt = source.info(u.hf[0])
        if is_float:
            return dt
    return torch.float32


# ----------------------------------------------------------------------------------------- public

def hf_to_megatron(hf_dir: str, target: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
                   extra_vocab_size: int = 0, divisible_by: int = 128, dtype=None,
                   family: Optional[str] = None, overwrite: bool = False,
                   log: Callable = print, side_files: Sequence[str] = ()) -> dict:
    """Convert an HF checkpoint folder into a Megatron legacy checkpoint at ``target``
    (``side_files``: see ``staging``)."""
    dtype = _dtype(dtype)
    hf_config = hf_io.read_config(hf_dir)
    fam, arch = family_and_arch(hf_config, family)
    check_layout(arch, tp, pp, ep)
    reader = hf_io.HFReader(hf_dir)
    rw = detect_reward(hf_config, reader.names())
    reward = rw is not None
    head = rw[0] if rw else "score.weight"
    if reward and head.replace(".weight", ".bias") in reader:
        arch.extra["reward_head_bias"] = True
    rename = _reward_rename(fam, arch, rw[1], reader.names()) if rw else \
        _base_prefix_rename(fam, arch, reader.names())
    source = HFSource(reader, rename)
    rows = model_rows(fam, arch, reward, head)
    L, n_exp = arch.config["num_layers"], num_experts(arch)
    units = global_units(rows, L, n_exp)
    tied = bool(arch.model.get("share_embeddings_and_output_weights"))
    ignorable = lambda n: fam.mapping.ignorable(n) or (tied and n == "lm_head.weight") or (
        reward and n == "lm_head.weight")
    _check_names([n for u in units for n in u.hf], source.names(), ignorable, hf_dir)

    emb_units = [u for u in units if u.mg == "embedding.word_embeddings.weight"]
    hf_vocab = int(source.info(emb_units[0].hf[0])[0][0]) if emb_units else \
        int(arch.model["vocab_size"])
    from megatron_patch.models.builder import padded_vocab

    if int(extra_vocab_size) < 0:
        raise ConversionError(f"extra_vocab_size must be >= 0, got {extra_vocab_size} (a negative "
                              "one would drop embedding rows)")
    if int(divisible_by) < 1:
        raise ConversionError(f"make_vocab_size_divisible_by must be >= 1, got {divisible_by}")
    orig_vocab = hf_vocab + int(extra_vocab_size)
    padded = padded_vocab(orig_vocab, divisible_by, tp)
    ctx = shard_ctx(arch, tp, orig_vocab, padded)
    out_dtype = dtype or _first_float_dtype(source, units)
    with staging(target, overwrite, (hf_dir,), side_files) as tmp:
        write_megatron(source.get, rows, arch, tmp, tp=tp, pp=pp, ep=ep, ctx=ctx, dtype=dtype,
                       log=log)
        meta = _meta(fam, arch, hf_config, tp, pp, ep, padded, orig_vocab, hf_vocab,
                     int(extra_vocab_size), divisible_by, reward,
                     _HF_DTYPE_NAMES.get(out_dtype, str(out_dtype)), converted_from="hf",
                     **({"reward_head": head} if reward else {}),
                     **({"hf_key_prefix": list(rename)} if rename else {}))
        layout.write_meta(tmp, meta)
        cfg = dict(hf_config)
        if extra_vocab_size:
            cfg["vocab_size"] = orig_vocab
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        hf_io.copy_side_files(hf_dir, tmp)
    log(f"converted {fam.name} {hf_dir} -> {target} (TP={tp} PP={pp} EP={ep}, vocab {orig_vocab} "
        f"padded to {padded}{', reward model' if reward else ''})")
    return meta


def _open_megatron(root: str, iteration=None):
    meta = layout.read_meta(root)
    hf_config = meta.get("hf_config") or layout.read_hf_config(root)
    if not hf_config:
        raise ConversionError(f"{root} carries neither megatron_patch.json with hf_config nor "
                              "config.json: cannot tell the architecture")
    fam, arch = family_and_arch(hf_config, meta.get("family"))
    reader = mg_io.MegatronReader(root, arch.config["num_layers"], num_experts(arch), iteration)
    return meta, hf_config, fam, arch, reader


def _megatron_units(meta, fam, arch, reader):
    reward = bool(meta.get("reward_model"))
    head = meta.get("reward_head", "score.weight")
    if reward and "rm_head.bias" in reader.names():
        arch.extra["reward_head_bias"] = True
    rows = model_rows(fam, arch, reward, head)
    units = global_units(rows, arch.config["num_layers"], num_experts(arch))
    tied = bool(arch.model.get("share_embeddings_and_output_weights"))
    skip = {"output_layer.weight"} if tied else set()
    if reward:
        skip.add("output_layer.weight")  # a reward model built with post_process has an unused LM head
    needed = [u.mg for u in units]
    _check_names(needed, reader.names(), lambda n: n in skip, reader.root)
    return rows, units, reward


def _vocab_sizes(meta, arch, reader, units):
    emb = [u for u in units if u.mg == "embedding.word_embeddings.weight"]
    padded = sum(s.shape[0] for s in reader.shards(emb[0].mg)) if emb else \
        meta.get("padded_vocab_size", arch.model["vocab_size"])
    orig = int(meta.get("original_vocab_size") or arch.model["vocab_size"])
    return orig, padded


@contextlib.contextmanager
def legacy_source(mg_dir: str, iteration, target: str, log: Callable = print):
    """``mg_dir`` itself when it is a legacy checkpoint; for a torch_dist checkpoint a temporary
    TP=1 legacy copy (beside ``target``, removed afterwards)."""
    from megatron_patch.convert import dist

    if not dist.is_torch_dist(mg_dir, iteration):
        yield mg_dir, iteration
        return
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(target)}.torch_dist-")
    try:
        log(f"note: {mg_dir} is a torch_dist checkpoint; reading it through megatron-core "
            "(model weights only)")
        dist.torch_dist_to_legacy(mg_dir, tmp, iteration)
        hf_io.copy_side_files(mg_dir, tmp)
        yield tmp, None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def megatron_to_hf(mg_dir: str, target: str, *, dtype=None, max_shard_bytes: int = 2 * 1024 ** 3,
                   iteration=None, overwrite: bool = False, log: Callable = print,
                   side_files: Sequence[str] = ()) -> dict:
    """Convert a Megatron checkpoint (converted or written by training; legacy or torch_dist) into
    an HF folder with safetensors shards, an index, config.json and the tokenizer files."""
    with legacy_source(mg_dir, iteration, target, log) as (src_dir, it):
        return _megatron_to_hf(src_dir, target, dtype=dtype, max_shard_bytes=max_shard_bytes,
                               iteration=it, overwrite=overwrite, log=log, label=mg_dir,
                               side_files=side_files)


def _megatron_to_hf(mg_dir: str, target: str, *, dtype, max_shard_bytes, iteration, overwrite,
                    log, label, side_files=()) -> dict:
    dtype = _dtype(dtype)
    meta, hf_config, fam, arch, reader = _open_megatron(mg_dir, iteration)
    rows, units, reward = _megatron_units(meta, fam, arch, reader)
    orig, padded = _vocab_sizes(meta, arch, reader, units)
    src = MegatronSource(reader, units, shard_ctx(arch, reader.tp, orig, padded))
    if reader.dropped:
        log(f"note: {', '.join(reader.dropped)} of the training checkpoint not converted")
    with staging(target, overwrite, (label, mg_dir), side_files) as tmp:
        w = hf_io.HFWriter(tmp, max_shard_bytes, dtype)
        file_prefix, map_prefix = meta.get("hf_key_prefix") or (None, None)
        for u in units:
            for n in u.hf:
                out_name = file_prefix + n[len(map_prefix):] if file_prefix and \
                    n.startswith(map_prefix) else n
                w.add(out_name, src.get(n))
        w.close()
        cfg = dict(hf_config)
        if cfg.get("vocab_size") != orig:
            cfg["vocab_size"] = orig
        written = dtype or w.dtype_written
        if written is not None:  # config.json names the dtype of the weights it comes with
            key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
            cfg[key] = _HF_DTYPE_NAMES[written]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        hf_io.copy_side_files(mg_dir, tmp)
    log(f"converted {fam.name} {label} (TP={reader.tp} PP={reader.pp} EP={reader.ep}) -> {target}")
    return {"family": fam.name, "reward_model": reward, "tp": reader.tp, "pp": reader.pp}


def reshard(mg_dir: str, target: str, *, tp: int = 1, pp: int = 1, ep: int = 1, dtype=None,
            divisible_by: Optional[int] = None, iteration=None, overwrite: bool = False,
            log: Callable = print, side_files: Sequence[str] = ()) -> dict:
    """Megatron -> Megatron (legacy output) at another TP/PP/EP, from a legacy or torch_dist
    checkpoint (model weights only; training state is dropped with a note)."""
    with legacy_source(mg_dir, iteration, target, log) as (src_dir, it):
        return _reshard(src_dir, target, tp=tp, pp=pp, ep=ep, dtype=dtype,
                        divisible_by=divisible_by, iteration=it, overwrite=overwrite, log=log,
                        label=mg_dir, side_files=side_files)


def _reshard(mg_dir: str, target: str, *, tp, pp, ep, dtype, divisible_by, iteration, overwrite,
             log, label, side_files=()) -> dict:
    dtype = _dtype(dtype)
    meta, hf_config, fam, arch, reader = _open_megatron(mg_dir, iteration)
    check_layout(arch, tp, pp, ep)
    rows, units, reward = _megatron_units(meta, fam, arch, reader)
    orig, padded_src = _vocab_sizes(meta, arch, reader, units)
    from megatron_patch.models.builder import padded_vocab

    div = int(divisible_by or meta.get("make_vocab_size_divisible_by", 128))
    if div < 1:
        raise ConversionError(f"make_vocab_size_divisible_by must be >= 1, got {div}")
    padded = padded_vocab(orig, div, tp)
    src = MegatronSource(reader, units, shard_ctx(arch, reader.tp, orig, padded_src))
    if reader.dropped:
        log(f"note: {', '.join(reader.dropped)} of the training checkpoint dropped; the resharded "
            "checkpoint holds model weights only")
    ctx = shard_ctx(arch, tp, orig, padded)
    with staging(target, overwrite, (label, mg_dir), side_files) as tmp:
        write_megatron(src.get, rows, arch, tmp, tp=tp, pp=pp, ep=ep, ctx=ctx, dtype=dtype, log=log)
        new_meta = dict(meta) if meta else {}
        new_meta.update(_meta(
            fam, arch, hf_config, tp, pp, ep, padded, orig,
            int(meta.get("hf_vocab_size", orig)), int(meta.get("extra_vocab_size", 0)), div, reward,
            meta.get("params_dtype", "float32") if dtype is None else _HF_DTYPE_NAMES[dtype],
            converted_from="megatron", source_iteration=reader.iteration,
            dropped_training_state=list(reader.dropped)))
        for k in ("reward_head", "hf_key_prefix"):
            if k in meta:
                new_meta[k] = meta[k]
        layout.write_meta(tmp, new_meta)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        hf_io.copy_side_files(mg_dir, tmp)
    log(f"resharded {label} (TP={reader.tp} PP={reader.pp} EP={reader.ep}) -> {target} "
        f"(TP={tp} PP={pp} EP={ep})")
    return new_meta
