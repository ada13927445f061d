"""GLM HF <-> Megatron weight table: LLaMA's rows with the QKV bias and the fused ``gate_up_proj``."""
from megatron_patch.convert.mapping import Mapping
from megatron_patch.models.common.mapping_rows import llama_rows

MAPPING = Mapping(lambda arch: llama_rows(arch, qkv_bias=bool(arch.config.get("add_qkv_bias")),
                                          fused_gate_up=True))
