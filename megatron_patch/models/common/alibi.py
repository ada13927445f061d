"""ALiBi attention for megatron-core (which has none: its local ``DotProductAttention`` asserts
``attention_bias is None``).

``alibi_slopes(n)`` gives the per-head slopes of the ALiBi paper (geometric for a power of two heads,
interleaved extra slopes otherwise). ``alibi_attention(scale_with_softmax)`` returns a
``DotProductAttention`` subclass that adds ``slope_h * j`` (j = key position) to the attention
scores of this TP rank's heads just before megatron's own masked softmax. Adding ``slope_h * j``
instead of ``-slope_h * (i - j)`` changes each score row by the constant ``slope_h * i``, which the
softmax ignores; it is how Bloom and Falcon compute it.

Bloom adds the bias after the ``1/sqrt(d)`` scaling; Falcon's ALiBi variant adds it before (so the
bias is scaled too): ``scale_with_softmax=True``; Falcon also forms ``slope * j`` in bfloat16 (as
the Falcon-RW models were trained, and as transformers does), which ``bf16_bias=True`` reproduces.

``key_positions(model, positions)``: for the duration, ``j`` is ``positions[row, slot]`` instead of
the key's slot: generation with left-padded rows gives each key its position in its own prompt, so
that the bias (rounded in bfloat16 for Falcon) is exactly the one of the unpadded row.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.dot_product_attention import DotProductAttention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """[num_heads] float32 slopes."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base, dtype=torch.float32),
                       torch.arange(1, closest + 1, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, num_heads - closest)
        extra = torch.pow(torch.tensor(extra_base, dtype=torch.float32),
                          torch.arange(1, 1 + 2 * n_extra, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


class _AlibiSoftmax(torch.nn.Module):
    """Wraps megatron's ``FusedScaleMaskSoftmax``: scores [b, np, sq, sk] + slopes[np] * j.

    ``positions``: None (j = the key's slot 0..sk-1) or [b, >= sk] int64, j = positions[:, :sk]
    (set by ``key_positions``)."""

    positions: Optional[torch.Tensor] = None

    def __init__(self, inner: torch.nn.Module, slopes: torch.Tensor, scale: float,
                 bf16_bias: bool = False):
        super().__init__()
        self.bf16_bias = bf16_bias
        self.inner = inner
        self.register_buffer("slopes", slopes, persistent=False)
        self.scale = scale

    def forward(self, scores, mask, softmax_offset=None):
        sk = scores.size(-1)
        slopes = self.slopes.to(scores.device).view(1, -1, 1, 1)  # [1, np, 1, 1]
        if self.positions is None:
            pos = torch.arange(sk, device=scores.device).view(1, 1, 1, sk)
        else:
            pos = self.positions[:, :sk].to(scores.device)[:, None, None, :]  # [b, 1, 1, sk]
        if self.bf16_bias:
            bias = (slopes.bfloat16() * pos).float()  # [1 or b, np, 1, sk]
        else:
            bias = slopes * pos.float()  # [1 or b, np, 1, sk]
        if self.scale != 1.0:
            bias = bias * self.scale
        return self.inner(scores + bias.to(scores.dtype), mask, softmax_offset)


class AlibiDotProductAttention(DotProductAttention):
    """megatron-core's local core attention plus ALiBi for the heads of this TP rank."""

    scale_with_softmax = False
    bf16_bias = False

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None,
                 **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection, **kwargs)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        n = self.num_attention_heads_per_partition
        slopes = alibi_slopes(config.num_attention_heads)[tp_rank * n:(tp_rank + 1) * n]  # [np]
        scale = self.softmax_scale if self.scale_with_softmax else 1.0
        self.scale_mask_softmax = _AlibiSoftmax(self.scale_mask_softmax, slopes, scale,
                                                self.bf16_bias)


class ScaledAlibiDotProductAttention(AlibiDotProductAttention):
    """Falcon's ALiBi: the bias is formed in bfloat16 and added before the 1/sqrt(d) scaling."""

    scale_with_softmax = True
    bf16_bias = True


@contextlib.contextmanager
def key_positions(model, positions: torch.Tensor):
    """ALiBi key positions [b, S] (S >= every key length of the calls) for every ALiBi core of
    ``model`` for the duration; yields whether the model has any."""
    cores = [m for m in model.modules() if isinstance(m, _AlibiSoftmax)]
    for m in cores:
        m.positions = positions
    try:
        yield bool(cores)
    finally:
        for m in cores:
            m.positions = None
