"""Load a legacy Megatron checkpoint (release or latest iteration) for generation on this rank.

``load_for_generation(ckpt, tp=, pp=)`` reads ``megatron_patch.json`` / ``config.json`` (the family and
the architecture: ``model_size='auto'``, or a size preset of the family), initialises the model
parallel state, builds this rank's ``GPTModel`` stage and loads its rank file. A checkpoint saved at
another TP/PP is resharded once (by rank 0, with the conversion engine) into a temporary folder that
is removed when the process exits.

``load_tokenizer(spec, ckpt)``: ``spec`` is a tokenizer folder / ``.model`` file / ``TOKENIZER_PATH``
key, or ``-`` / ``none`` / empty for the tokenizer files stored in the checkpoint folder.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch


class GenerationSetupError(RuntimeError):
    """A problem with the checkpoint, tokenizer or layout, reported as one line by the CLI."""


@dataclasses.dataclass
class LoadedModel:
    model: object
    family: str
    hf_config: dict
    vocab_size: int  # ids the tokenizer can produce (logits beyond are vocabulary padding)
    padded_vocab_size: int
    max_position_embeddings: Optional[int]
    checkpoint: str


def _checkpoint_layout(root: str, num_layers: int, n_experts: int):
    from megatron_patch.convert import mg_io
    from megatron_patch.convert.rules import ConversionError

    try:
        r = mg_io.MegatronReader(root, num_layers, n_experts)
    except ConversionError as e:
        raise GenerationSetupError(str(e)) from None
    return r.tp, r.pp, r.ep


def _arch(meta: dict, hf_config: Optional[dict], model_size: str, family: Optional[str] = None,
          log=print):
    from megatron_patch.models.registry import family_for_hf_config, get_family

    if meta.get("family") and family and meta["family"] != family:
        log(f"note: the checkpoint is a {meta['family']} model (script family {family}); "
            f"using {meta['family']}")
    family = meta.get("family") or (None if hf_config else family)
    if model_size and model_size.lower() != "auto":
        fam = get_family(family) if family else family_for_hf_config(hf_config or {})
        try:
            preset = fam.preset(model_size)
        except KeyError as e:
            raise GenerationSetupError(str(e).strip('"')) from None
        if hf_config and int(preset.get("num_hidden_layers", preset.get("n_layer", -1))) != int(
                hf_config.get("num_hidden_layers", hf_config.get("n_layer", -2))):
            raise GenerationSetupError(f"MODEL_SIZE {model_size} does not match the checkpoint's "
                                       "config.json (use auto)")
        if hf_config and "vocab_size" in hf_config:
            preset["vocab_size"] = hf_config["vocab_size"]
        hf_config = preset
    if not hf_config:
        raise GenerationSetupError("the checkpoint has no config.json / hf_config; pass MODEL_SIZE")
    fam = get_family(family) if family else family_for_hf_config(hf_config)
    return fam, fam.config_table.to_megatron(hf_config), hf_config


def load_for_generation(ckpt: str, *, tp: int = 1, pp: int = 1, model_size: str = "auto",
                        family: Optional[str] = None, precision: str = "fp32", flash: bool = False, seed: int = 1234,
                        log=print, inference: bool = True) -> LoadedModel:
    """Build and load this rank's stage; torch.distributed is initialised here from the torchrun
    environment when it is not yet. A world larger than TP*PP runs data-parallel replicas.
    ``inference``: build with the inference-only modules (``models.common.inference``: a KV cache
    of rotated keys, linears without autograd wrappers); False builds megatron-core's own."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_patch import platform
    from megatron_patch.convert import layout, load
    from megatron_patch.models.builder import build_gpt_model, transformer_config

    if not os.path.isdir(ckpt):
        raise GenerationSetupError(f"checkpoint folder {ckpt} does not exist")
    try:
        iteration = layout.read_tracker(ckpt)  # None = release
    except layout.CheckpointError as e:
        raise GenerationSetupError(f"{ckpt} is not a Megatron checkpoint: {e}") from None
    meta = layout.read_meta(ckpt)  # {} for a checkpoint without our metadata
    hf_config = meta.get("hf_config") or layout.read_hf_config(ckpt)
    fam, arch, hf_config = _arch(meta, hf_config, model_size, family, log)
    n_exp = int(arch.config.get("num_moe_experts") or 0)
    platform.init_process_group()
    world = torch.distributed.get_world_size()
    if world % (tp * pp):
        raise GenerationSetupError(f"{world} processes do not split into TP={tp} x PP={pp} model "
                                   "replicas: start a multiple of TP*PP ranks")
    c_tp, c_pp, c_ep = _checkpoint_layout(ckpt, arch.config["num_layers"], n_exp)
    # Generation holds every expert on each rank (EP=1): the ranks beyond TP x PP are independent
    # data-parallel replicas that decode different prompts for different numbers of steps, while
    # expert parallelism needs every rank of its group in each forward. An EP>1 checkpoint is
    # regathered into a temporary copy.
    ep = 1
    root = ckpt
    if (c_tp, c_pp, c_ep) != (tp, pp, ep):
        root = _resharded(ckpt, tp, pp, ep, log)
        iteration = layout.read_tracker(root)
        meta = layout.read_meta(root) or meta  # the vocabulary may be re-padded for the new TP
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size()) != (tp, pp, ep):
            ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(seed)
    cfg = transformer_config(arch, tp=tp, pp=pp, ep=ep, precision=precision,
                             sequence_parallel=tp > 1 and n_exp > 0)
    padded = int(meta.get("padded_vocab_size") or arch.model["vocab_size"])
    model = build_gpt_model(arch, cfg, vocab_size=padded, flash=flash, inference=inference).eval()
    load.load_rank(model, root, tp_rank=ps.get_tensor_model_parallel_rank(),
                   pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pp,
                   ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ep, iteration=iteration)
    vocab = int(meta.get("original_vocab_size") or hf_config.get("vocab_size") or padded)
    max_pos = hf_config.get("max_position_embeddings") or hf_config.get("seq_length")
    return LoadedModel(model, fam.name, hf_config, min(vocab, padded), padded,
                       int(max_pos) if max_pos else None, ckpt)


def resolve_precision(ckpt: str, precision: str = "auto") -> str:
    """``auto``: fp32 on a CPU; on a GPU the dtype the checkpoint was saved in (bf16 when it does
    not say). Any other value is returned as it is."""
    if precision != "auto":
        return precision
    from megatron_patch import platform

    if not platform.use_cuda():
        return "fp32"
    from megatron_patch.convert import layout

    dt = str(layout.read_meta(ckpt).get("params_dtype", "bfloat16"))
    return {"float16": "fp16", "float32": "fp32"}.get(dt, "bf16")


def _resharded(ckpt: str, tp: int, pp: int, ep: int, log) -> str:
    """Rank 0 reshards into a temporary folder; the path is shared with the other ranks."""
    from megatron_patch.training.checkpointing import resharded_copy

    return resharded_copy(ckpt, tp, pp, ep, log=log)


def load_tokenizer(spec: Optional[str], ckpt: str, tp: int = 1):
    """The tokenizer named by ``spec`` (path or key), or the one stored in the checkpoint."""
    from megatron_patch.tokenizer import build_tokenizer

    path = ckpt if spec in (None, "", "-", "none", "None") else spec
    try:
        return build_tokenizer("auto", path, tensor_model_parallel_size=tp)
    except (FileNotFoundError, ValueError) as e:
        raise GenerationSetupError(f"tokenizer: {e}") from None
