"""Sharding rules: how one HF tensor (or a group of them) becomes the tensor-parallel shards of one
Megatron parameter, and back.

Each rule is named once here and used by every family's mapping table. A rule has two directions:

- ``to_mg(hf_tensors, ctx) -> [shard_0, ..., shard_{tp-1}]``
- ``to_hf(shards, ctx) -> hf_tensors``

and ``to_hf(to_mg(x)) == x`` bit for bit (the round-trip tests check it for every family). The
mapping tables only name rules; the reverse direction is never written by hand.

Rules:
``REPLICATED``  same tensor on every TP rank (norms, row-parallel biases, router, position table)
``COLUMN``      split on dim 0 (column-parallel weight and bias)
``ROW``         split on dim 1 (row-parallel weight)
``VOCAB``       pad the vocabulary rows, then split on dim 0 (embedding, output layer)
``qkv(layout)`` fuse q, k, v into Megatron's per-group interleave ``[q_0..q_{n/g-1}, k, v]`` per
                query group, then split on dim 0 (megatron-core also splits the fused tensor evenly
                when groups < TP and gathers it back at run time)
``GATED``       SwiGLU ``linear_fc1``: each TP rank holds ``[gate_r; up_r]``
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

Tensor = torch.Tensor


class ConversionError(RuntimeError):
    """A conversion cannot proceed; the message names the offending keys, files or sizes."""


@dataclasses.dataclass
class ShardCtx:
    """What the rules need to know about the model and the layout."""

    tp: int
    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int  # rows of the HF embedding (original vocab, including any extra tokens)
    padded_vocab_size: int  # rows of the Megatron embedding


def _chunk(t: Tensor, parts: int, dim: int, what: str) -> List[Tensor]:
    if t.shape[dim] % parts:
        raise ConversionError(f"{what}: dim {dim} of shape {tuple(t.shape)} does not split into "
                              f"{parts} tensor-parallel parts")
    return list(torch.chunk(t, parts, dim=dim))


class Rule:
    name = "rule"
    arity = 1  # number of HF tensors this rule fuses

    def to_mg(self, hf: Sequence[Tensor], ctx: ShardCtx) -> List[Tensor]:
        raise NotImplementedError

    def to_hf(self, shards: Sequence[Tensor], ctx: ShardCtx) -> List[Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class _Replicated(Rule):
    name = "replicated"

    def to_mg(self, hf, ctx):
        return [hf[0]] * ctx.tp

    def to_hf(self, shards, ctx):
        return [shards[0]]


class _Split(Rule):
    def __init__(self, name: str, dim: int):
        self.name, self.dim = name, dim

    def to_mg(self, hf, ctx):
        return _chunk(hf[0], ctx.tp, self.dim, self.name)

    def to_hf(self, shards, ctx):
        return [torch.cat(list(shards), dim=self.dim) if len(shards) > 1 else shards[0]]


class _Vocab(Rule):
    """Vocabulary-parallel rows: HF [V, h] -> padded [V_pad, h] (zero rows) -> TP split on dim 0."""

    name = "vocab"

    def to_mg(self, hf, ctx):
        t = hf[0]
        if t.shape[0] > ctx.padded_vocab_size:
            raise ConversionError(f"vocab tensor has {t.shape[0]} rows, more than the padded "
                                  f"vocabulary {ctx.padded_vocab_size}")
        if t.shape[0] < ctx.padded_vocab_size:
            pad = t.new_zeros((ctx.padded_vocab_size - t.shape[0],) + tuple(t.shape[1:]))
            t = torch.cat([t, pad], dim=0)  # [V, h] -> [V_pad, h]
        return _chunk(t, ctx.tp, 0, self.name)

    def to_hf(self, shards, ctx):
        full = torch.cat(list(shards), dim=0) if len(shards) > 1 else shards[0]  # [V_pad, h]
        if full.shape[0] < ctx.vocab_size:
            raise ConversionError(f"checkpoint vocabulary has {full.shape[0]} rows, fewer than the "
                                  f"{ctx.vocab_size} the HF model needs")
        return [full[: ctx.vocab_size]]  # [V, h]


class _QKV(Rule):
    """Fused attention input projection (weight [rows, h] or bias [rows]).

    ``layout`` is how the HF side stores it:
    - ``separate``: three tensors q [nh*d], k [ng*d], v [ng*d] (LLaMA, Qwen2, Mistral, GLM, OPT)
    - ``concat``:   one tensor [q; k; v] (Falcon-7B multi-query)
    - ``grouped``:  one tensor already in Megatron's per-group order (Bloom: ng = nh; Falcon-40B)
    """

    def __init__(self, layout: str):
        if layout not in ("separate", "concat", "grouped"):
            raise ValueError(f"unknown qkv layout {layout!r}")
        self.layout = layout
        self.name = f"qkv[{layout}]"
        self.arity = 3 if layout == "separate" else 1

    @staticmethod
    def _dims(ctx: ShardCtx):
        nh, ng, d = ctx.num_heads, ctx.num_groups, ctx.head_dim
        if nh % ng:
            raise ConversionError(f"{nh} heads do not split into {ng} query groups")
        return nh, ng, d

    def fuse(self, hf: Sequence[Tensor], ctx: ShardCtx) -> Tensor:
        nh, ng, d = self._dims(ctx)
        if self.layout == "grouped":
            return hf[0]
        if self.layout == "concat":
            q, k, v = torch.split(hf[0], [nh * d, ng * d, ng * d], dim=0)
        else:
            q, k, v = hf
        rest = tuple(q.shape[1:])
        q = q.reshape((ng, nh // ng, d) + rest)  # [nh*d, ...] -> [ng, nh/ng, d, ...]
        k = k.reshape((ng, 1, d) + rest)  # [ng*d, ...] -> [ng, 1, d, ...]
        v = v.reshape((ng, 1, d) + rest)
        # [ng, nh/ng + 2, d, ...] -> [(nh + 2ng)*d, ...]
        return torch.cat([q, k, v], dim=1).reshape(((nh + 2 * ng) * d,) + rest)

    def to_mg(self, hf, ctx):
        return _chunk(self.fuse(hf, ctx), ctx.tp, 0, self.name)

    def to_hf(self, shards, ctx):
        nh, ng, d = self._dims(ctx)
        full = torch.cat(list(shards), dim=0) if len(shards) > 1 else shards[0]
        if self.layout == "grouped":
            return [full]
        rest = tuple(full.shape[1:])
        g = full.reshape((ng, nh // ng + 2, d) + rest)  # [(nh+2ng)*d, ...] -> [ng, nh/ng+2, d, ...]
        q = g[:, : nh // ng].reshape((nh * d,) + rest)
        k = g[:, nh // ng].reshape((ng * d,) + rest)
        v = g[:, nh // ng + 1].reshape((ng * d,) + rest)
        if self.layout == "concat":
            return [torch.cat([q, k, v], dim=0)]
        return [q, k, v]


class _Gated(Rule):
    """SwiGLU input projection: HF gate [f, h] and up [f, h] (or one fused [gate; up] [2f, h])
    -> TP rank r holds [gate_r; up_r] ([2f/tp, h])."""

    def __init__(self, fused: bool):
        self.fused = fused
        self.arity = 1 if fused else 2
        self.name = "gated[fused]" if fused else "gated"

    def to_mg(self, hf, ctx):
        gate, up = torch.chunk(hf[0], 2, dim=0) if self.fused else hf
        gates = _chunk(gate, ctx.tp, 0, self.name)
        ups = _chunk(up, ctx.tp, 0, self.name)
        return [torch.cat([g, u], dim=0) for g, u in zip(gates, ups)]

    def to_hf(self, shards, ctx):
        halves = [torch.chunk(s, 2, dim=0) for s in shards]  # [2f/tp, h] -> 2 x [f/tp, h]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        return [torch.cat([gate, up], dim=0)] if self.fused else [gate, up]


REPLICATED = _Replicated()
COLUMN = _Split("column", 0)
ROW = _Split("row", 1)
VOCAB = _Vocab()
GATED = _Gated(fused=False)
GATED_FUSED = _Gated(fused=True)


def qkv(layout: str = "separate") -> Rule:
    return _QKV(layout)


def compact(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A tensor that owns exactly its bytes (views of a bigger tensor would save the whole storage)."""
    if dtype is not None and t.dtype != dtype:
        return t.to(dtype).contiguous()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size() \
            or t.storage_offset() != 0:
        return t.contiguous().clone()
    return t
