"""Falcon family: ``FalconForCausalLM`` (parallel attention + MLP; multi-query 7B, new decoder
architecture 40B with KV groups and two norms; the ALiBi variant)."""
from megatron_patch.models.falcon import config, mapping, spec
from megatron_patch.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="falcon",
    hf_architectures=("FalconForCausalLM", "RWForCausalLM"),
    hf_model_types=("falcon",),
    config_table=config.TABLE,
    layer_spec=spec.layer_spec,
    presets=config.PRESETS,
    mapping=mapping.MAPPING,
    default_tokenizer="falconbpe",
))
