"""Modules megatron-core 0.16 lacks, added through layer specs (never by copying Megatron files).

- ``Norm``: LayerNorm/RMSNorm that works with sequence parallelism. megatron-core's local
  ``WrappedTorchNorm`` asserts ``not sequence_parallel``; ours tags its parameters with
  ``sequence_parallel=True`` so that ``finalize_model_grads`` all-reduces their gradients over TP.
- ``SDPAttention``: a core attention on ``torch.nn.functional.scaled_dot_product_attention`` (the
  fused/flash path of PyTorch, on CPU and GPU), used for ``FL=true`` when Transformer Engine is absent.
- ``with_bias(cls)``: a linear (megatron-core's or Transformer Engine's) built with a bias whatever
  the config says. HF LLaMA's ``attention_bias`` biases Q/K/V and ``o_proj``, ``mlp_bias`` the MLP;
  megatron-core's ``add_bias_linear`` switches ``linear_proj`` and the MLP together (``add_qkv_bias``
  covers Q/K/V alone), so a spec gives the biased module only where the HF model has one.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class Norm:
    """Factory with the signature megatron-core passes to its norms (like ``WrappedTorchNorm``)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: Optional[str] = None):
        kind = normalization or config.normalization
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the local norm")
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {kind!r}")
        if config.params_dtype is not None:
            norm.to(dtype=config.params_dtype)
        if config.sequence_parallel:
            for p in norm.parameters():
                p.sequence_parallel = True
        return norm


class SDPAttention(MegatronModule):
    """Core attention over ``F.scaled_dot_product_attention`` with GQA and causal masking.

    Input q: [sq, b, np, hn], k/v: [sk, b, ng, hn] (local heads of this TP rank); output
    [sq, b, np * hn], the contract of megatron-core's ``DotProductAttention``. With GQA, K/V are
    repeated per query head, except without autograd on a CPU (generation), where the kernel's
    ``enable_gqa`` gives the same output bitwise without copying the KV cache every step.
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, **kwargs):
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.num_heads = config.num_attention_heads // tp
        self.hidden_per_head = config.kv_channels
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.hidden_per_head)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("SDPAttention does not take packed_seq_params; pass a block mask")
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, np_, hn = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = False
        if k.shape[1] != np_:
            if not torch.is_grad_enabled() and q.device.type == "cpu":
                # inference on a CPU: the kernel reads each KV group for its query heads itself,
                # bitwise what it computes on repeated K/V (tested), without copying the KV cache
                # on every decode step
                gqa = True
            else:  # GQA: repeat each KV group for its query heads
                rep = np_ // k.shape[1]
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        mask = None
        causal = False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        elif mask_type == AttnMaskType.causal:
            causal = sq == k.shape[2] and sq > 1
        if attention_bias is not None:
            bias = attention_bias.to(q.dtype)
            if mask is not None:
                bias = bias.masked_fill(~mask, float("-inf"))
            elif causal:
                cm = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril()
                bias = bias.masked_fill(~cm, float("-inf"))
                causal = False
            mask = bias
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            **({"enable_gqa": True} if gqa else {}))
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


_BIASED = {}


def with_bias(cls):
    """The subclass of the linear ``cls`` whose constructor always passes ``bias=True`` (one class
    per ``cls``; ``biased_of`` names it, e.g. for the inference-module swap)."""
    if cls not in _BIASED:
        def __init__(self, *args, bias=True, **kwargs):
            cls.__init__(self, *args, bias=True, **kwargs)

        _BIASED[cls] = type(f"Biased{cls.__name__}", (cls,), {
            "__init__": __init__, "biased_of": cls, "__module__": __name__,
            "__doc__": f"{cls.__name__} with a bias whatever config.add_bias_linear says."})
    return _BIASED[cls]
