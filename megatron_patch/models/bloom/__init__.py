"""Bloom family: ``BloomForCausalLM`` (ALiBi, embedding LayerNorm, per-head fused QKV)."""
from megatron_patch.models.bloom import config, mapping, model, spec
from megatron_patch.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="bloom",
    hf_architectures=("BloomForCausalLM",),
    hf_model_types=("bloom",),
    config_table=config.TABLE,
    layer_spec=spec.layer_spec,
    presets=config.PRESETS,
    mapping=mapping.MAPPING,
    post_build=model.post_build,
    default_tokenizer="bloombpe",
))
