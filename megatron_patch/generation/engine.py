"""Batched generation over a megatron-core ``GPTModel`` with megatron-core's KV cache
(``StaticInferenceContext``), at any TP x PP, on a live model (no checkpoint round trip). Models
built by ``loader.load_for_generation`` carry the inference-only modules of
``models.common.inference`` (keys cached after RoPE, linears without autograd wrappers; bitwise the
same tokens); a training model generates through megatron-core's own modules.

How a batch of prompts of different lengths is run (left padding, one prefill):
- every row is left-padded to the longest prompt L (row i has ``pad_i = L - len_i`` padding slots),
  so all prompts end at slot L - 1; one prefill over L slots with a causal + key-padding mask
  ``[b, 1, L, L]`` (a padding query attends to itself only, so no softmax row is empty), then one
  decode forward per new token with the mask ``[b, 1, 1, t + 1]`` of the padding keys:
  ``max_new_tokens`` forwards in all, whatever the spread of the prompt lengths;
- each row keeps the positions of its unpadded prompt: ``position(slot) = max(slot - pad_i, 0)``,
  used as the learned absolute position ids (OPT/Galactica, whose offset is added by the embedding),
  as the RoPE angle of queries and keys (megatron-core's static cache rotates by cache slot: for the
  call its rotary table is replaced by a per-row one ``[S, b, 1, d]``, so cached keys are rotated
  with their row's positions) and as the ALiBi key position (``alibi.key_positions``; the bias is
  rounded in bfloat16 for Falcon, so it is not shift-invariant and must use the row's positions).
  Padding keys are masked in every layer on every step, so each row computes what its unpadded
  prompt computes;
- the old scheme (right padding, the prefill over the shortest prompt, the decode loop feeding the
  longer prompts one token per step; megatron's own static batching) is kept for the models whose
  attention would drop an explicit mask: Transformer Engine's core attention (causal prefill,
  no mask on decode), megatron's local core attention with a sliding window (Mistral/Mixtral: its
  window mask replaces the one passed) or with the fused causal softmax kernel (fp16/bf16 with
  ``masked_softmax_fusion``: it ignores the mask), flash decoding, and YaRN / mRoPE / MLA position
  embeddings. A batch of equal lengths runs the same in both (no mask, no padding).

Pipeline parallel (PP > 1): every stage keeps the KV cache of its own layers; hidden states go to the
next stage by point-to-point send/recv; the last stage samples and the chosen tokens are broadcast to
every rank of the model-parallel group (TP x PP), which also keeps TP ranks in lockstep.

Log-probs: ``logprobs[i, j]`` is ``log_softmax`` of the model's raw logits (no penalty, temperature
or filtering) at the chosen token, in float32: what a forward pass of the policy gives (PPO).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, List, Optional, Sequence

import torch

from megatron_patch.generation.sampling import SamplingParams, make_generator, sample


@dataclasses.dataclass
class GenerationOutput:
    """Generated tokens per row (prompt not included), padded with ``pad_id`` after ``lengths``.

    tokens: [b, max_new_tokens] int64; lengths: [b] (a final stop token is included);
    logprobs: [b, max_new_tokens] float32 (0 after ``lengths``) or None;
    prompt_lengths: [b]; finish_reasons: "stop_token" | "stop" (stop_fn) | "length" per row.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    logprobs: Optional[torch.Tensor]
    prompt_lengths: torch.Tensor
    finish_reasons: List[str]

    def row(self, i: int) -> List[int]:
        """The generated ids of row i."""
        return self.tokens[i, : int(self.lengths[i])].tolist()

    def sequences(self, prompts: Sequence[Sequence[int]], pad_id: int = 0):
        """(ids [b, L], mask [b, L]) of prompt + generation, right-padded: what PPO trains on."""
        rows = [list(p) + self.row(i) for i, p in enumerate(prompts)]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids, mask


_REASONS = ("length", "stop_token", "stop")
GPU_DONE_CHECK_EVERY = 8  # decode steps between "all rows done?" checks on a GPU (each one syncs)


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (forward still goes through the wrappers)."""
    while hasattr(model, "module"):
        model = model.module
    return model


# module attributes megatron-core caches from config.sequence_parallel at construction
_SP_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def inference_mode(model):
    """eval + torch.inference_mode + sequence parallelism off for the duration; restores everything
    after."""
    was_training = model.training
    inner = unwrap(model)
    cfg = getattr(inner, "config", None)
    sp_was = bool(getattr(cfg, "sequence_parallel", False))
    toggled = []
    if sp_was:
        # one token per step cannot be split over TP ranks: run the layers without SP
        for m in inner.modules():
            for attr in _SP_FLAGS:
                if getattr(m, attr, None) is True:
                    setattr(m, attr, False)
                    toggled.append((m, attr))
        cfg.sequence_parallel = False
    if was_training:
        model.eval()
    try:
        # inference mode, not just no_grad: no version counters or autograd metadata on the ~40
        # small tensors of every layer step (~10% of a decode step of a small model on a CPU).
        # Nothing made here outlives the call except the KV cache (a reused context) and
        # megatron-core's rotary-table cache, read through torch.cos/sin (normal tensors) in
        # training; the returned tokens / log-probs are written into tensors made outside.
        with torch.inference_mode():
            yield
    finally:
        for m, attr in toggled:
            setattr(m, attr, True)
        if sp_was:
            cfg.sequence_parallel = True
        if was_training:
            model.train()


class _Parallel:
    """What the loop needs to know about TP/PP; a world of one when torch.distributed is off."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized()
        self.first = self.last = True
        self.pp = 1
        self.src = 0
        self.group = None
        if not self.on:
            return
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            self.on = False
            return
        self.ps = ps
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.first = ps.is_pipeline_first_stage(ignore_virtual=True)
        self.last = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.group = ps.get_model_parallel_group()
        self.mp_size = dist.get_world_size(self.group)
        is_src = self.last and ps.get_tensor_model_parallel_rank() == 0
        flag = torch.tensor([dist.get_rank() if is_src else -1], dtype=torch.long,
                            device=self._device())
        if self.mp_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.src = int(flag.item())

    def _device(self):
        from megatron_patch import platform

        return platform.current_device()

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.on and self.mp_size > 1:
            self.dist.broadcast(t, src=self.src, group=self.group)
        return t

    def recv_hidden(self, shape, dtype, device) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        self.dist.recv(buf, src=self.ps.get_pipeline_model_parallel_prev_rank())
        return buf

    def send_hidden(self, t: torch.Tensor) -> None:
        self.dist.send(t.contiguous(), dst=self.ps.get_pipeline_model_parallel_next_rank())


class _Forward:
    """One forward of this rank's stage with the KV cache; returns float logits [b, V] on the last
    stage (for the last position of the chunk), None elsewhere."""

    def __init__(self, model, ctx, par: _Parallel, vocab_limit: Optional[int]):
        self.model, self.ctx, self.par = model, ctx, par
        self.inner = unwrap(model)
        cfg = self.inner.config
        self.hidden = cfg.hidden_size
        self.dtype = cfg.pipeline_dtype or cfg.params_dtype or torch.float32
        self.vocab_limit = vocab_limit

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        b, s = ids.shape
        if not self.par.first:
            # [s, b, h] activations of the previous stage
            self.inner.set_input_tensor(self.par.recv_hidden((s, b, self.hidden), self.dtype,
                                                             ids.device))
        out = self.model(ids, pos, mask, inference_context=self.ctx, runtime_gather_output=True)
        self.ctx.sequence_len_offset += s
        if not self.par.last:
            self.par.send_hidden(out)
            return None
        logits = out[:, -1, :]  # [b, 1 or s, V] -> [b, V]
        if self.vocab_limit is not None:
            logits = logits[:, : self.vocab_limit]
        return logits.float()


def _context(batch: int, max_len: int, ctx=None):
    from megatron.core.inference.contexts import StaticInferenceContext

    if ctx is not None and ctx.max_batch_size == batch and ctx.max_sequence_length >= max_len:
        ctx.reset()  # reuse the KV buffers of an earlier call
        return ctx
    return StaticInferenceContext(batch, max_len)


def left_padding_supported(model) -> bool:
    """Whether this stage can run a left-padded batch: every core attention applies the explicit
    mask it is given, on the prefill (causal type) and on decode steps (no-mask type), and the
    positions are learned, RoPE (megatron-core's ``RotaryEmbedding``) or none (ALiBi)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_patch.models.common.modules import SDPAttention

    inner = unwrap(model)
    cfg = inner.config
    if getattr(cfg, "flash_decode", False) or getattr(cfg, "multi_latent_attention", False):
        return False  # flash decoding kernels take no mask; MLA rotates inside its attention
    kind = getattr(inner, "position_embedding_type", None)
    if kind not in ("rope", "learned_absolute", "none"):
        return False  # yarn / mrope: no per-row rotary table here
    if kind == "rope" and type(getattr(inner, "rotary_pos_emb", None)) is not RotaryEmbedding:
        return False
    for m in inner.modules():
        core = getattr(m, "core_attention", None)
        if core is None or not isinstance(core, torch.nn.Module):
            continue
        if isinstance(core, SDPAttention):
            continue
        if isinstance(core, DotProductAttention):
            sm = core.scale_mask_softmax
            sm = getattr(sm, "inner", sm)  # the ALiBi wrapper
            if getattr(sm, "window_size", None) is not None:
                return False  # FusedScaleMaskSoftmax replaces the mask by the sliding-window one
            if sm.scaled_masked_softmax_fusion and sm.input_in_float16:
                return False  # the fused causal kernel ignores the mask on the prefill
            continue
        return False  # Transformer Engine or unknown: the mask may be dropped
    return True


@contextlib.contextmanager
def _row_positions(inner, positions: Optional[torch.Tensor]):
    """For the duration, RoPE and ALiBi use ``positions`` [b, S] (S = the KV cache's length) per
    row instead of the cache slot; None leaves the model as it is."""
    if positions is None:
        yield
        return
    from megatron_patch.models.common import alibi

    rope = getattr(inner, "rotary_pos_emb", None)
    if getattr(inner, "position_embedding_type", None) != "rope":
        rope = None
    patched = False
    if rope is not None:
        base = rope.forward  # megatron-core's (lru-cached) [S, 1, 1, d] table by slot
        tables = {}

        def per_row(max_seq_len, offset=0, packed_seq=False, cp_group=None):
            key = (max_seq_len, offset)
            if key not in tables:
                emb = base(max_seq_len, offset, packed_seq=packed_seq, cp_group=cp_group)
                if emb.shape[0] < positions.shape[1]:
                    raise RuntimeError(f"rotary table of {emb.shape[0]} positions for a cache of "
                                       f"{positions.shape[1]}")
                idx = positions[:, : emb.shape[0]].to(emb.device)  # [b, S]
                # [S, d][b, S] -> [b, S, d] -> [S, b, 1, d]: row i's slot j at its own position
                tables[key] = emb[:, 0, 0][idx].transpose(0, 1).unsqueeze(2).contiguous()
            return tables[key]

        had = "forward" in rope.__dict__
        rope.forward = per_row
        patched = True
    try:
        with alibi.key_positions(inner, positions):
            yield
    finally:
        if patched:
            if had:
                rope.forward = base
            else:
                del rope.forward


class _Book:
    """The per-row outputs of the loop and the stop rules."""

    def __init__(self, b, max_new, params, pad_id, device, stop_fn, last):
        self.rows = torch.arange(b, device=device)
        self.max_new = max_new
        self.tokens = torch.full((b, max(max_new, 0)), int(pad_id), dtype=torch.long,
                                 device=device)
        self.logp = torch.zeros((b, max_new), dtype=torch.float32, device=device) \
            if params.return_logprobs else None
        self.n_gen = torch.zeros(b, dtype=torch.long, device=device)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.reason = torch.zeros(b, dtype=torch.long, device=device)  # index into _REASONS
        self.stop_ids = torch.tensor(sorted(set(int(t) for t in params.stop_token_ids)),
                                     dtype=torch.long, device=device)
        self.stop_fn = stop_fn
        self.last = last
        self.seen = None  # [b, V] tokens of prompt + generation (repetition penalty)

    def record(self, nxt: torch.Tensor, logits: Optional[torch.Tensor], active: torch.Tensor,
               slot) -> None:
        """Rows ``active`` produced ``nxt`` as their output number ``slot`` ([b] or an int)."""
        rows = self.rows
        self.tokens[rows, slot] = torch.where(active, nxt, self.tokens[rows, slot])
        if self.logp is not None and self.last:
            lp = torch.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            self.logp[rows, slot] = torch.where(active, lp, self.logp[rows, slot])
        if self.seen is not None:
            col = nxt.unsqueeze(-1)  # [b, 1]
            self.seen.scatter_(1, col, self.seen.gather(1, col) | active.unsqueeze(-1))
        self.n_gen += active.long()
        finished = active & (self.n_gen >= self.max_new)
        if self.stop_ids.numel():
            hit = active & torch.isin(nxt, self.stop_ids)
            self.reason = torch.where(hit, 1, self.reason)
            finished |= hit
        if self.stop_fn is not None:
            for i in (active & ~finished).nonzero().flatten().tolist():
                if self.stop_fn(i, self.tokens[i, : int(self.n_gen[i])].tolist()):
                    self.reason[i] = 2
                    finished[i] = True
        self.done |= finished


def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
             pad_id: int = 0, vocab_size: Optional[int] = None,
             max_sequence_length: Optional[int] = None,
             stop_fn: Optional[Callable[[int, List[int]], bool]] = None,
             inference_context=None) -> GenerationOutput:
    """Generate up to ``params.max_new_tokens`` tokens after each prompt (lists of token ids).

    Every rank of the model-parallel group calls this with the same prompts and params.
    ``vocab_size``: logits beyond it (vocabulary padding) are never sampled. ``stop_fn(i, ids)`` is
    asked after each token of row i (ids = its generated tokens so far) and ends the row when True.
    ``inference_context``: a ``StaticInferenceContext`` to reuse (same batch size, long enough).
    Rows need at least one prompt token (prepend BOS for an empty prompt).
    """
    b = len(prompts)
    if b == 0:
        raise ValueError("generate: no prompts")
    lens = [len(p) for p in prompts]
    if min(lens) == 0:
        raise ValueError("generate: every prompt needs at least one token (prepend BOS)")
    max_new = int(params.max_new_tokens)
    min_len, max_len = min(lens), max(lens)
    total = max_len + max_new
    if max_sequence_length is not None and total > max_sequence_length:
        raise ValueError(f"prompt length {max_len} + {max_new} new tokens exceeds the maximum "
                         f"sequence length {max_sequence_length}; truncate the prompts")
    par = _Parallel()
    device = next(unwrap(model).parameters()).device
    lens_t = torch.tensor(lens, dtype=torch.long, device=device)
    book = _Book(b, max_new, params, pad_id, device, stop_fn, par.last)
    if max_new == 0:
        return GenerationOutput(book.tokens.cpu(), book.n_gen.cpu(), book.logp.cpu() if book.logp
                                is not None else None, lens_t.cpu(), ["length"] * b)
    left = min_len < max_len and left_padding_supported(model)
    if par.on and par.mp_size > 1 and min_len < max_len:
        # every stage must run the same loop (a stage may hold e.g. windowed layers only)
        flag = torch.tensor([int(left)], dtype=torch.long, device=par._device())
        par.dist.all_reduce(flag, op=par.dist.ReduceOp.MIN, group=par.group)
        left = bool(flag.item())
    gen = make_generator(params.seed, device) if par.last and not params.is_greedy else None
    ctx = _context(b, total, inference_context)
    forward = _Forward(model, ctx, par, vocab_size)
    # the loop never waits for the device except to ask "all rows done?", which on a GPU is asked
    # every few steps only (finished rows just stop changing, the extra steps cost nothing else)
    check_every = 1 if device.type == "cpu" else GPU_DONE_CHECK_EVERY
    tokens = torch.full((b, total), int(pad_id), dtype=torch.long, device=device)
    S = ctx.max_sequence_length  # KV cache slots (>= total when a context is reused)
    slots = torch.arange(S, dtype=torch.long, device=device).unsqueeze(0)  # [1, S]
    if left:
        pads = max_len - lens_t  # [b] left padding of each row
        for i, p in enumerate(prompts):
            tokens[i, max_len - lens[i]: max_len] = torch.as_tensor(list(p), dtype=torch.long,
                                                                    device=device)
        positions = (slots - pads.unsqueeze(1)).clamp(min=0)  # [b, S] each row's own positions
        key_pad = slots < pads.unsqueeze(1)  # [b, S] True = padding key
        causal = torch.ones(max_len, max_len, dtype=torch.bool, device=device).triu(1)
        eye = torch.eye(max_len, dtype=torch.bool, device=device)
        # [b, 1, L, L], True = masked: future keys and padding keys; a padding query sees itself
        prefill_mask = ((causal | key_pad[:, None, :max_len]) & ~eye).unsqueeze(1)
        decode_mask = key_pad[:, None, None, :]  # [b, 1, 1, S], sliced to [.., :t + 1] per step
    else:
        for i, p in enumerate(prompts):
            tokens[i, : lens[i]] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        positions = slots.expand(b, -1)
    with inference_mode(model), _row_positions(unwrap(model), positions if left else None):
        first = max_len if left else min_len
        logits = forward(tokens[:, :first], positions[:, :first],
                         prefill_mask if left else None)  # [b, V] at slot first - 1
        ctx.enable_decode_mode()
        if par.last and params.repetition_penalty != 1.0:
            V = logits.shape[-1]
            book.seen = torch.zeros((b, V), dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                ids = torch.as_tensor(list(p), dtype=torch.long, device=device)
                book.seen[i, ids[ids < V]] = True
        nxt = torch.empty(b, dtype=torch.long, device=device)
        if left:
            # every row is past its prompt: step k gives output k of every unfinished row
            for k in range(max_new):
                if par.last:
                    nxt.copy_(sample(logits, params, gen, book.seen))
                par.broadcast(nxt)
                book.record(nxt, logits, ~book.done, k)
                if k == max_new - 1 or (k % check_every == check_every - 1
                                        and bool(book.done.all())):
                    break
                t = max_len + k
                tokens[:, t] = nxt
                logits = forward(tokens[:, t:t + 1], positions[:, t:t + 1],
                                 decode_mask[..., : t + 1])
        else:
            # right padding (see the module docstring): a row still inside its prompt is fed its
            # next prompt token, and what was sampled for it is thrown away
            for t in range(min_len, total):
                if par.last:
                    nxt.copy_(sample(logits, params, gen, book.seen))
                par.broadcast(nxt)
                # rows that produce a new token at position t (past their prompt, not finished)
                active = (lens_t <= t) & ~book.done
                tokens[:, t] = torch.where(active, nxt, tokens[:, t])
                book.record(nxt, logits, active, (t - lens_t).clamp(0, max_new - 1))
                if t == total - 1 or ((t - min_len) % check_every == check_every - 1
                                      and bool(book.done.all())):
                    break
                logits = forward(tokens[:, t:t + 1], positions[:, t:t + 1])
    if book.logp is not None and par.pp > 1:
        par.broadcast(book.logp)
    return GenerationOutput(book.tokens.cpu(), book.n_gen.cpu(),
                            book.logp.cpu() if book.logp is not None else None, lens_t.cpu(),
                            [_REASONS[c] for c in book.reason.tolist()])


def forward_logprobs(model, sequences: torch.Tensor, vocab_size: Optional[int] = None
                     ) -> torch.Tensor:
    """log p(sequences[:, j+1] | sequences[:, :j+1]) for every j by one forward without a cache:
    [b, s] ids -> [b, s-1] float32 on the CPU (single pipeline stage only; PPO computes its own)."""
    b, s = sequences.shape
    sequences = sequences.to(next(unwrap(model).parameters()).device)
    pos = torch.arange(s, device=sequences.device).unsqueeze(0).expand(b, -1)
    with inference_mode(model):
        logits = model(sequences, pos, None, runtime_gather_output=True)  # [b, s, V]
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    lp = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # [b, s-1, V]
    return lp.gather(-1, sequences[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
