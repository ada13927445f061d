"""GLM family: ``GlmForCausalLM`` (GLM-4 / ChatGLM2-3 structure) on megatron-core ``GPTModel``."""
from megatron_patch.models.glm import config, mapping, spec
from megatron_patch.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="glm",
    hf_architectures=("GlmForCausalLM",),
    hf_model_types=("glm",),
    config_table=config.TABLE,
    layer_spec=spec.layer_spec,
    presets=config.PRESETS,
    mapping=mapping.MAPPING,
    default_tokenizer="glmbpe",
))
