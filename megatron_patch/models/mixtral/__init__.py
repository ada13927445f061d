"""Mixtral family: ``MixtralForCausalLM`` (LLaMA attention + megatron-core MoE layer)."""
from megatron_patch.models.mixtral import config, mapping, spec
from megatron_patch.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_model_types=("mixtral",),
    config_table=config.TABLE,
    layer_spec=spec.layer_spec,
    presets=config.PRESETS,
    mapping=mapping.MAPPING,
    default_tokenizer="llamabpe",
))
