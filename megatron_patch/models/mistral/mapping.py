"""Mistral HF <-> Megatron weight table: the same rows as LLaMA."""
from megatron_patch.convert.mapping import Mapping
from megatron_patch.models.common.mapping_rows import llama_rows

MAPPING = Mapping(lambda arch: llama_rows(arch))
