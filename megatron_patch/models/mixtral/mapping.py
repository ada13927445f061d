"""Mixtral HF <-> Megatron weight table: LLaMA attention rows, the router, and per-expert SwiGLU
(``w1`` gate, ``w3`` up, ``w2`` down) onto ``mlp.experts.local_experts.{e}`` (EP-local index)."""
from megatron_patch.convert.mapping import Mapping
from megatron_patch.models.common.mapping_rows import llama_rows

MAPPING = Mapping(lambda arch: llama_rows(arch, moe=True))
