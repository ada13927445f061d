"""LLaMA-1/2/3 HF <-> Megatron weight table (GQA fused QKV, SwiGLU gate/up, tied or untied head)."""
from megatron_patch.convert.mapping import Mapping
from megatron_patch.models.common.mapping_rows import llama_rows

MAPPING = Mapping(lambda arch: llama_rows(arch))
