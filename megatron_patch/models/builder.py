"""Build a megatron-core ``GPTModel`` for any registered family.

``arch_from_hf(hf_config)`` turns an HF config into a ``MegatronArch`` through the family's table;
``transformer_config(arch, ...)`` adds parallelism, precision, recompute and the CPU rules;
``build_gpt_model(arch, config, ...)`` builds this rank's stage with the family's layer spec.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_patch import platform
from megatron_patch.models.common.config import MegatronArch
from megatron_patch.models.common.spec import block_spec, have_te
from megatron_patch.models.registry import family_for_hf_config, get_family

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def arch_from_hf(hf_config: dict, family: Optional[str] = None) -> MegatronArch:
    fam = get_family(family) if family else family_for_hf_config(hf_config)
    return fam.config_table.to_megatron(hf_config)


def padded_vocab(vocab_size: int, divisible_by: int = 128, tp: int = 1) -> int:
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def check_parallel(arch: MegatronArch, tp: int, pp: int, vpp: Optional[int] = None) -> None:
    """Fail early (before anything is built or written) on layouts the model cannot take."""
    c = arch.config
    heads, groups = c["num_attention_heads"], c.get("num_query_groups") or c["num_attention_heads"]
    if heads % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide the {heads} attention heads")
    if groups % tp and tp % groups:
        raise ValueError(f"tensor parallel size {tp} and the {groups} KV groups do not divide "
                         "one another")
    if c["ffn_hidden_size"] % tp:
        raise ValueError(f"tensor parallel size {tp} does not divide ffn_hidden_size "
                         f"{c['ffn_hidden_size']}")
    stages = pp * (vpp or 1)
    if c["num_layers"] % stages:
        raise ValueError(f"{c['num_layers']} layers do not split into {pp} pipeline stages"
                         + (f" x {vpp} virtual stages" if vpp else ""))


def transformer_config(arch: MegatronArch, *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None,
                       ep: int = 1, sequence_parallel: bool = False, precision: str = "fp32",
                       recompute: str = "none", recompute_layers: int = 1,
                       hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                       init_method_std: float = 0.02, **overrides) -> TransformerConfig:
    check_parallel(arch, tp, pp, vpp)
    dtype = _DTYPES[precision]
    cuda = platform.use_cuda()
    kw = dict(arch.config)
    kw.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        init_method_std=init_method_std,
        use_cpu_initialization=True,  # the full weight is built from the seed, then split: TP-exact
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        memory_efficient_layer_norm=False,
        moe_grouped_gemm=False,
        bias_dropout_fusion=cuda,
        masked_softmax_fusion=cuda and have_te(),  # the fused softmax kernels come with TE/Apex
        # only the SwiGLU kernel is exact: Megatron's fused GELU is the tanh approximation (it
        # changes Bloom's/Falcon's/Galactica's logits) and other activations raise in MLP.forward
        bias_activation_fusion=cuda and _is_swiglu(kw),
        # gloo matches p2p messages per peer in posting order: batched p2p swaps them under VPP
        batch_p2p_comm=not (vpp and not cuda),
        deallocate_pipeline_outputs=True,
    )
    if recompute in ("full", "selective"):
        kw["recompute_granularity"] = recompute
        if recompute == "full":
            kw.update(recompute_method="uniform", recompute_num_layers=recompute_layers)
    elif recompute not in ("none", "", None):
        raise ValueError(f"recompute must be full, selective or none, got {recompute!r}")
    if ep > 1 or kw.get("num_moe_experts"):
        kw.setdefault("moe_token_dispatcher_type", "alltoall" if cuda else "allgather")
    kw.update(overrides)
    return TransformerConfig(**kw)


def _is_swiglu(kw) -> bool:
    import torch.nn.functional as F
    return bool(kw.get("gated_linear_unit")) and kw.get("activation_func", F.gelu) is F.silu


def build_gpt_model(arch: MegatronArch, config: TransformerConfig, *, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, vp_stage: Optional[int] = None,
                    vocab_size: Optional[int] = None, max_sequence_length: Optional[int] = None,
                    use_te: Optional[bool] = None, flash: bool = False,
                    parallel_output: bool = True, reward_head: bool = False,
                    reward_head_bias: bool = False, inference: bool = False) -> GPTModel:
    """This rank's stage of the model. ``vocab_size`` is the padded size (defaults to the config's).
    ``reward_head``: a ``GPTRewardModel`` (scalar head instead of the LM head).
    ``inference``: a generation build, with the inference-only attention (a KV cache of rotated
    keys) and linears of ``models.common.inference`` (same weights and outputs; no faster to train)."""
    fam = get_family(arch.family)
    if use_te is None:
        use_te = platform.use_cuda() and have_te()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    layer = fam.layer_spec(arch, use_te=use_te, flash=flash)
    if inference:
        from megatron_patch.models.common.inference import inference_layer_spec

        layer = inference_layer_spec(layer)
    final_norm = None
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    spec = block_spec(layer, config, vp_stage=vp_stage, **({"final_norm": final_norm} if final_norm else {}))
    m = dict(arch.model)
    for key, value in arch.extra.get("yarn", {}).items():
        setattr(config, key, value)  # read by GPTModel and the attention (not dataclass fields)
    cls, more = GPTModel, {}
    if reward_head:
        from megatron_patch.models.reward import GPTRewardModel

        cls, more = GPTRewardModel, {"head_bias": reward_head_bias}
    model = cls(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size or m.pop("vocab_size"),
        max_sequence_length=max_sequence_length or m.pop("max_sequence_length"),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=m.get("share_embeddings_and_output_weights", False),
        position_embedding_type=m.get("position_embedding_type", "learned_absolute"),
        rotary_percent=m.get("rotary_percent", 1.0),
        rotary_base=m.get("rotary_base", 10000),
        rope_scaling=m.get("rope_scaling", False),
        rope_scaling_factor=m.get("rope_scaling_factor", 8.0),
        vp_stage=vp_stage,
        **more,
    )
    if fam.post_build is not None:
        fam.post_build(model, arch)
    if arch.extra.get("rope_linear_factor"):
        from megatron_patch.models.common.llama_like import scale_rope_linear

        scale_rope_linear(model, arch.extra["rope_linear_factor"])
    if inference:
        from megatron_patch.models.common.inference import adopt_inference_modules

        adopt_inference_modules(model)
    if platform.use_cuda():
        model.cuda(torch.cuda.current_device())
    return model
