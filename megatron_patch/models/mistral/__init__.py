"""Mistral family: ``MistralForCausalLM`` (LLaMA structure with sliding-window attention)."""
from megatron_patch.models.mistral import config, mapping, spec
from megatron_patch.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    hf_model_types=("mistral",),
    config_table=config.TABLE,
    layer_spec=spec.layer_spec,
    presets=config.PRESETS,
    mapping=mapping.MAPPING,
    default_tokenizer="llamabpe",
))
