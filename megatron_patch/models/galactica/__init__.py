"""Galactica / OPT family: ``OPTForCausalLM`` (learned positions with offset 2, LayerNorm, GeLU or
ReLU, biases everywhere) on megatron-core ``GPTModel``."""
from megatron_patch.models.galactica import config, mapping, model, spec
from megatron_patch.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="galactica",
    hf_architectures=("OPTForCausalLM",),
    hf_model_types=("opt",),
    config_table=config.TABLE,
    layer_spec=spec.layer_spec,
    presets=config.PRESETS,
    mapping=mapping.MAPPING,
    post_build=model.post_build,
    default_tokenizer="galacticabpe",
))
