"""LLaMA-1/2/3 HF <-> Megatron weight table (GQA fused QKV, SwiGLU gate/up, tied or untied head;
the biases of ``attention_bias`` / ``mlp_bias``)."""
from megatron_patch.convert.mapping import Mapping
from megatron_patch.models.common.mapping_rows import llama_rows

MAPPING = Mapping(lambda arch: llama_rows(arch, qkv_bias=bool(arch.config.get("add_qkv_bias")),
                                          proj_bias=bool(arch.extra.get("proj_bias")),
                                          mlp_bias=bool(arch.extra.get("mlp_bias"))))
