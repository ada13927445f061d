"""LLaMA model-level fix-ups after ``GPTModel`` is built.

megatron-core's llama3 RoPE scaling hard-codes low/high frequency factors 1/4 and an original context
of 8192; configs that say otherwise get their inverse frequencies recomputed here with the same rule.
"""
from __future__ import annotations

import math

import torch


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position_embeddings: int) -> torch.Tensor:
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def post_build(model, arch) -> None:
    rope = arch.extra.get("llama3_rope")
    emb = getattr(model, "rotary_pos_emb", None)
    if rope is None or emb is None:
        return
    dim = arch.config["kv_channels"]
    base = arch.model.get("rotary_base", 10000.0)
    device = emb.inv_freq.device
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    emb.inv_freq = llama3_inv_freq(plain, **rope)
