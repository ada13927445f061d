"""Inference-only modules for generation builds, selected through the layer spec.

``inference_layer_spec(spec)`` returns a copy of a layer spec with the classes below in place of
megatron-core's exact ``SelfAttention`` / ``ColumnParallelLinear`` / ``RowParallelLinear``, and
``adopt_inference_modules(model)`` turns the output layer, the word embedding and the MLPs into
theirs after the build; ``build_gpt_model(..., inference=True)`` (what
``generation.loader.load_for_generation`` builds) does both. The modules keep the parameters,
state-dict keys and sharded state dicts of their bases and run the same floating-point operations,
so logits and greedy tokens are unchanged bit for bit; in training (autograd on) or any case they
do not cover they call their base class.

What megatron-core 0.16 lacks:

- ``RotatedKVSelfAttention``: megatron-core's static KV cache (``Attention.
  _adjust_key_value_for_inference``) stores keys before RoPE and, on every decode step, rotates the
  whole cached key ``[0, t]`` again with ``k_pos_emb[:t + 1]``: O(t) elementwise work and
  allocations per layer per step. Only its flash-decoding path caches rotated keys, and that needs
  flash-attn kernels (CUDA). This attention rotates the new query and key rows only, once, and keeps
  the rotated keys in its own cache buffers in the same ``StaticInferenceContext`` (under the key
  ``("rotated_kv", layer_number)``, so the two kinds of cache never mix). RoPE is elementwise per
  position, so a cached key is bitwise the key megatron-core would rotate again. The core attention
  (``SDPAttention``, ``DotProductAttention``, ALiBi, ...) is called with the same arguments.
- ``InferenceColumnParallelLinear`` / ``InferenceRowParallelLinear``: under ``torch.no_grad``
  megatron-core still routes every GEMM through autograd functions (the TP copy/reduce mappings and
  the linear with async all-reduce), and ``RowParallelLinear.forward`` passes ``tp_group=None`` to
  its linear, which calls ``warnings.warn(DeprecationWarning)`` on rank 0 on every call. Without
  autograd these layers do the same ``torch.matmul(x, w.t())`` (+ bias) and the same TP all-reduce /
  all-gather directly (a few Python calls instead of ~15 per GEMM); the output layer too, and the
  word embedding at TP = 1 (``InferenceVocabParallelEmbedding``).
- ``InferenceMLP``: on a CPU, the gated unit's gate and up GEMMs run separately where that is
  bitwise the fused GEMM's result (its docstring).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_patch.models.common.modules import SDPAttention, with_bias

CACHE_KEY = "rotated_kv"


def _tp_size(group) -> int:
    return group.size() if group is not None else 1


class InferenceColumnParallelLinear(ColumnParallelLinear):
    """``ColumnParallelLinear`` whose no-grad forward skips the autograd wrappers (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tp = _tp_size(self.tp_group)

    @classmethod
    def adopt(cls, layer: ColumnParallelLinear) -> None:
        """Turn a built ``ColumnParallelLinear`` (GPTModel's output layer, which no spec names)
        into this class in place; its parameters and state-dict keys stay as they are."""
        if type(layer) is ColumnParallelLinear:
            layer.__class__ = cls
            layer._tp = _tp_size(layer.tp_group)

    def fast(self, weight: Optional[torch.Tensor]) -> bool:
        """Whether a forward with this weight takes the direct path."""
        return not (torch.is_grad_enabled() or weight is None or self.sequence_parallel
                    or self.explicit_expert_comm or self.config.defer_embedding_wgrad_compute
                    or self.config._cpu_offloading_context is not None
                    or weight.shape != (self.output_size_per_partition, self.input_size))

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        w = self.weight if weight is None else weight  # a tied output layer passes the embedding's
        if not self.fast(w):
            return super().forward(input_, weight, runtime_gather_output)
        # megatron-core's input goes through copy_to_tensor_model_parallel_region, an autograd
        # function that returns it as ``view_as`` itself: a [s, 1, h] input with a stale batch
        # stride (a transposed [1, s, h]) gets the plain strides, and torch.matmul on a 3-D input
        # can round differently with the two, so the same view is taken here
        input_ = input_.view_as(input_)
        # the forward of LinearWithGradAccumulationAndAsyncCommunication / LinearWithFrozenWeight
        output = torch.matmul(input_, w.t())
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and self._tp > 1:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, (self.bias if self.skip_bias_add else None)


class InferenceVocabParallelEmbedding(VocabParallelEmbedding):
    """``VocabParallelEmbedding`` whose no-grad forward at TP = 1 is the lookup alone (megatron-core
    still calls its TP reduce, an autograd function, which is the identity on one rank)."""

    def forward(self, input_):
        if torch.is_grad_enabled() or self._tp > 1 or self.reduce_scatter_embeddings:
            return super().forward(input_)
        if self.deterministic_mode:
            return self.weight[input_]
        return torch.nn.functional.embedding(input_, self.weight)


class InferenceRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` whose no-grad forward skips the autograd wrappers (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tp = _tp_size(self.tp_group)

    def forward(self, input_: torch.Tensor):
        if (torch.is_grad_enabled() or not self.input_is_parallel or self.sequence_parallel
                or self.explicit_expert_comm or self.config._cpu_offloading_context is not None):
            return super().forward(input_)
        output = torch.matmul(input_, self.weight.t())
        if self._tp > 1:  # reduce_from_tensor_model_parallel_region's forward
            torch.distributed.all_reduce(output, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        if self.bias is not None:
            output = output + self.bias
        return output, None


class RotatedKVSelfAttention(SelfAttention):
    """``SelfAttention`` with a static KV cache of rotated keys (module doc)."""

    def _covers(self, inference_context, key_value_states, rotary_pos_cos, rotary_pos_sin,
                rotary_pos_cos_sin, packed_seq_params) -> bool:
        cfg = self.config
        return (inference_context is not None and not self.training
                and inference_context.is_static_batching()
                and key_value_states is None and packed_seq_params is None
                and rotary_pos_cos is None and rotary_pos_sin is None
                and rotary_pos_cos_sin is None
                and not cfg.flash_decode and not cfg.attention_output_gate
                and not getattr(cfg, "fused_single_qkv_rope", False)
                and getattr(cfg, "cuda_graph_impl", "none") == "none"
                and not getattr(self, "offload_qkv_linear", False)
                and not getattr(self, "offload_core_attention", False)
                and not getattr(self, "offload_attn_proj", False))

    def _cache(self, ctx, key: torch.Tensor, value: torch.Tensor):
        """This layer's (key, value) buffers, [S, B, ng, hn] like megatron-core's. For the core
        attentions of this package and megatron-core's local one they are views of [B, ng, S, hn]
        storage (each head's keys contiguous, what the attention kernels read best; as fast to
        write one row to); Transformer Engine's and other kernels get plain [S, B, ng, hn]."""
        name = (CACHE_KEY, self.layer_number)
        buffers = ctx.key_value_memory_dict.get(name)
        if buffers is None:
            S, B = ctx.max_sequence_length, ctx.max_batch_size
            heads_major = isinstance(self.core_attention, (SDPAttention, DotProductAttention))
            buffers = []
            for t in (key, value):
                ng, hn = t.size(2), t.size(3)
                shape = (B, ng, S, hn) if heads_major else (S, B, ng, hn)
                mem = torch.empty(shape, dtype=t.dtype, device=t.device)
                buffers.append(mem.permute(2, 0, 1, 3) if heads_major else mem)
            buffers = tuple(buffers)
            ctx.key_value_memory_dict[name] = buffers
        return buffers

    def _rope(self, ctx, t: torch.Tensor, table: torch.Tensor, start: int, end: int):
        """RoPE on the rows [start, end) of the cache: ``table`` is indexed by cache slot,
        [S, 1 or b, 1, d]. The cos/sin of a slice are computed once per forward and shared by the
        layers and by q and k (megatron-core's ``apply_rotary_pos_emb`` recomputes them per call);
        the arithmetic is its unfused ``_apply_rotary_pos_emb_bshd``, operation for operation."""
        cfg = self.config
        mscale = _yarn_get_concentration_factor_from_config(cfg)
        if cfg.apply_rope_fusion or cfg.rotary_interleaved or cfg.multi_latent_attention:
            return apply_rotary_pos_emb(t, table[start:end], config=cfg, mscale=mscale,
                                        cp_group=self.pg_collection.cp)
        memo = ctx.__dict__.setdefault("rotated_kv_rope_memo", {})
        key = (id(table), start, end, mscale, t.dtype)
        hit = memo.get(key)
        if hit is None or hit[0] is not table:
            freqs = table[start:end]
            hit = (table, freqs.shape[-1], (torch.cos(freqs) * mscale).to(t.dtype),
                   (torch.sin(freqs) * mscale).to(t.dtype))
            if len(memo) > 8:
                memo.clear()
            memo[key] = hit
        _, rot, cos_, sin_ = hit
        x, x_pass = t[..., :rot], t[..., rot:]
        x1, x2 = torch.chunk(x, 2, dim=-1)
        x = (x * cos_) + (torch.cat((-x2, x1), dim=-1) * sin_)
        return torch.cat((x, x_pass), dim=-1) if x_pass.shape[-1] else x

    def forward(self, hidden_states, attention_mask, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None,
                rotary_pos_cos_sin=None, attention_bias=None, packed_seq_params=None,
                sequence_len_offset=None, *, inference_params=None):
        ctx = inference_context if inference_context is not None else inference_params
        if not self._covers(ctx, key_value_states, rotary_pos_cos, rotary_pos_sin,
                            rotary_pos_cos_sin, packed_seq_params):
            return super().forward(
                hidden_states, attention_mask, key_value_states=key_value_states,
                inference_context=inference_context, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                rotary_pos_cos_sin=rotary_pos_cos_sin, attention_bias=attention_bias,
                packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset,
                inference_params=inference_params)
        cfg = self.config
        if cfg.no_rope_freq and cfg.no_rope_freq[self.layer_number - 1]:
            rotary_pos_emb = None
        # [sq, b, h] -> q [sq, b, np, hn], k/v [sq, b, ng, hn] (q/k layernorms applied)
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        start = ctx.sequence_len_offset
        end = start + key.size(0)
        b0 = ctx.batch_size_offset
        b1 = b0 + key.size(1)
        key_mem, value_mem = self._cache(ctx, key, value)
        if end > key_mem.size(0) or b1 > key_mem.size(1):
            raise RuntimeError(f"KV cache of {key_mem.size(0)} slots x {key_mem.size(1)} rows is "
                               f"too small for slots [{start}, {end}) of rows [{b0}, {b1})")
        # the prompt forward is causal; past it a query sees every cached key (as megatron-core)
        attn_mask_type = self.attn_mask_type if start == 0 else AttnMaskType.no_mask
        if rotary_pos_emb is not None:
            if isinstance(rotary_pos_emb, tuple):
                q_emb, k_emb = rotary_pos_emb
            else:
                q_emb = k_emb = rotary_pos_emb
            if q_emb is not None:
                query = self._rope(ctx, query, q_emb, start, end)
            if k_emb is not None:
                key = self._rope(ctx, key, k_emb, start, end)
        key_mem[start:end, b0:b1] = key  # [s, b, ng, hn]
        value_mem[start:end, b0:b1] = value
        key = key_mem[:end, b0:b1]  # [sk, b, ng, hn], rotated
        value = value_mem[:end, b0:b1]
        core_attn_out = self.core_attention(query, key, value, attention_mask,
                                            attn_mask_type=attn_mask_type,
                                            attention_bias=attention_bias, packed_seq_params=None)
        return self.linear_proj(core_attn_out)  # ([sq, b, h], bias)


SPLIT_MULTIPLE = 64  # InferenceMLP splits an FFN width (per TP rank) that is a multiple of this


class InferenceMLP(MLP):
    """megatron-core's ``MLP`` whose no-grad forward on a CPU runs the gated unit's two GEMMs
    separately: ``linear_fc1``'s weight is ``[gate; up]`` (each TP rank's own halves), so the two
    are views, and at a few rows two ``[n, h] x [h, f]`` GEMMs take less time in MKL than one
    ``[n, h] x [h, 2f]`` (~5% of a 100M LLaMA's decode step at 8 rows, 640 x 1728). Each GEMM
    output element is the same dot product, and the activation is ``glu``'s
    ``act(gate) * (up + offset)``. The activation itself is bitwise the same only when ``f`` is a
    multiple of 64 (``SPLIT_MULTIPLE``): torch's CPU elementwise kernels run a row in chunks of two
    SIMD vectors (32 floats with AVX-512) and its remainder element by element, and ``silu``
    rounds differently on the two paths; a row of the fused output's gate half (a strided view)
    has a remainder where the contiguous gate, one long row, has none (f = 176: log-probs 4.8e-7
    apart; f = 128, 1728: equal; tested). Other widths keep the fused GEMM, as does a GPU, where
    GEMM kernels are chosen by shape."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        fc1, cfg = self.linear_fc1, self.config
        if (per_token_scale is not None or hidden_states.device.type != "cpu"
                or not cfg.gated_linear_unit or cfg.use_te_activation_func
                or cfg.bias_activation_fusion or not isinstance(fc1, InferenceColumnParallelLinear)
                or fc1.gather_output or not fc1.fast(fc1.weight)
                or fc1.weight.size(0) % (2 * SPLIT_MULTIPLE)):
            return super().forward(hidden_states, per_token_scale=per_token_scale, **kwargs)
        f = fc1.weight.size(0) // 2
        hidden_states = hidden_states.view_as(hidden_states)  # as linear_fc1 takes it (its forward)
        gate = torch.matmul(hidden_states, fc1.weight[:f].t())  # [s, b, f]
        up = torch.matmul(hidden_states, fc1.weight[f:].t())
        if fc1.bias is not None:  # what the fused output + bias would hold, element by element
            gate = gate + fc1.bias[:f]
            up = up + fc1.bias[f:]
        if (val := cfg.activation_func_clamp_value) is not None:
            gate = gate.clamp(min=None, max=val)
            up = up.clamp(min=-val, max=val)
        return self.linear_fc2(cfg.activation_func(gate) * (up + cfg.glu_linear_offset))


_SWAPS = {SelfAttention: RotatedKVSelfAttention,
          ColumnParallelLinear: InferenceColumnParallelLinear,
          RowParallelLinear: InferenceRowParallelLinear}


def _swap(cls):
    """The inference module for exactly ``cls``, also for a ``modules.with_bias`` class of it;
    ``cls`` itself otherwise."""
    if cls in _SWAPS:
        return _SWAPS[cls]
    base = cls.__dict__.get("biased_of") if isinstance(cls, type) else None
    return with_bias(_SWAPS[base]) if base in _SWAPS else cls


def inference_layer_spec(spec: ModuleSpec) -> ModuleSpec:
    """A copy of ``spec`` with the inference-only modules in place of exactly megatron-core's
    ``SelfAttention``, ``ColumnParallelLinear`` and ``RowParallelLinear`` (subclasses, Transformer
    Engine layers and everything else are kept)."""
    spec = copy.deepcopy(spec)

    def visit(node):
        if isinstance(node, ModuleSpec):
            node.module = _swap(node.module)
            visit(node.submodules)
        elif node is not None and hasattr(node, "__dataclass_fields__"):
            for name in node.__dataclass_fields__:
                child = getattr(node, name)
                if isinstance(child, type) and _swap(child) is not child:
                    setattr(node, name, _swap(child))
                else:
                    visit(child)
        elif isinstance(node, (list, tuple)):
            for child in node:
                visit(child)

    visit(spec)
    return spec


def adopt_inference_modules(model) -> None:
    """After the build: the output layer (``GPTModel`` builds it itself, no spec names it) becomes
    an ``InferenceColumnParallelLinear``, the word embedding an ``InferenceVocabParallelEmbedding``
    and every exact ``MLP`` an ``InferenceMLP``, in place (parameters and state-dict keys
    unchanged). The MLP is not swapped in the spec because
    megatron-core's ``TransformerLayer`` hands its TP group to exactly ``MLP`` only (a subclass is
    built with the default group and a warning)."""
    out = getattr(model, "output_layer", None)
    if out is not None:
        InferenceColumnParallelLinear.adopt(out)
    emb = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if type(emb) is VocabParallelEmbedding:
        emb.__class__ = InferenceVocabParallelEmbedding
        emb._tp = _tp_size(emb.tp_group)
    for m in model.modules():
        if type(m) is MLP:
            m.__class__ = InferenceMLP
