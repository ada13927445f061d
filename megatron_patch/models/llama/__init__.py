"""LLaMA-1/2/3 family: ``LlamaForCausalLM`` on megatron-core ``GPTModel``."""
from megatron_patch.models.llama import config, mapping, model, spec
from megatron_patch.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_model_types=("llama",),
    config_table=config.TABLE,
    layer_spec=spec.layer_spec,
    presets=config.PRESETS,
    mapping=mapping.MAPPING,
    post_build=model.post_build,
    default_tokenizer="llamabpe",
))
