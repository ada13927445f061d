"""Qwen2 family: ``Qwen2ForCausalLM`` (LLaMA structure with QKV bias) on megatron-core ``GPTModel``."""
from megatron_patch.models.qwen2 import config, mapping, spec
from megatron_patch.models.registry import Family, register_family

FAMILY = register_family(Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    hf_model_types=("qwen2",),
    config_table=config.TABLE,
    layer_spec=spec.layer_spec,
    presets=config.PRESETS,
    mapping=mapping.MAPPING,
    default_tokenizer="qwenbpe",
))
