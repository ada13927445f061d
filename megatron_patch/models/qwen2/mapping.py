"""Qwen2 HF <-> Megatron weight table: LLaMA's rows plus the fused QKV bias."""
from megatron_patch.convert.mapping import Mapping
from megatron_patch.models.common.mapping_rows import llama_rows

MAPPING = Mapping(lambda arch: llama_rows(arch, qkv_bias=True))
