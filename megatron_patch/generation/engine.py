"""Batched generation over a megatron-core ``GPTModel`` with megatron-core's KV cache
(``StaticInferenceContext``), at any TP x PP, on a live model (no checkpoint round trip).

How a batch of prompts of different lengths is run (megatron's own static-batching scheme):
- no left padding: every row keeps its tokens at their true positions 0..n-1, the batch is
  right-padded, and the prefill runs over the shortest prompt's length only (causal attention, no
  padding mask needed);
- the decode loop then feeds one position per step for the whole batch; a row whose prompt is longer
  than the current position is fed its own next prompt token (and what was sampled for it is thrown
  away), the others get the sampled token. So every row sees exactly the computation of its unpadded
  prompt (same positions, same keys), which also holds for learned absolute positions and ALiBi.
- cost: prompts longer than the shortest one are read one token per step instead of in the prefill.

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
    """eval + no_grad + sequence parallelism off for the duration; restores everything after."""
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
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, attr in toggled:
            setattr(m, attr, True)
        if sp_was:
            cfg.sequence_parallel = True
        model.train(was_training)


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

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> Optional[torch.Tensor]:
        b, s = ids.shape
        if not self.par.first:
            # [s, b, h] activations of the previous stage
            self.inner.set_input_tensor(self.par.recv_hidden((s, b, self.hidden), self.dtype,
                                                             ids.device))
        out = self.model(ids, pos, None, inference_context=self.ctx, runtime_gather_output=True)
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
    tokens = torch.full((b, total), int(pad_id), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : lens[i]] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    lens_t = torch.tensor(lens, dtype=torch.long, device=device)
    positions = torch.arange(total, dtype=torch.long, device=device).unsqueeze(0).expand(b, -1)
    out_tokens = torch.full((b, max(max_new, 0)), int(pad_id), dtype=torch.long, device=device)
    out_logp = torch.zeros((b, max_new), dtype=torch.float32, device=device) \
        if params.return_logprobs else None
    n_gen = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    reason = torch.zeros(b, dtype=torch.long, device=device)  # index into _REASONS
    if max_new == 0:
        return GenerationOutput(out_tokens.cpu(), n_gen.cpu(), out_logp.cpu() if out_logp is not
                                None else None, lens_t.cpu(), ["length"] * b)
    stop_ids = torch.tensor(sorted(set(int(t) for t in params.stop_token_ids)), dtype=torch.long,
                            device=device)
    gen = make_generator(params.seed, device) if par.last and not params.is_greedy else None
    seen = None
    ctx = _context(b, total, inference_context)
    forward = _Forward(model, ctx, par, vocab_size)
    rows = torch.arange(b, device=device)
    # the loop never waits for the device except to ask "all rows done?", which on a GPU is asked
    # every few steps only (finished rows just stop changing, the extra steps cost nothing else)
    check_every = 1 if device.type == "cpu" else GPU_DONE_CHECK_EVERY
    with inference_mode(model):
        logits = forward(tokens[:, :min_len], positions[:, :min_len])  # [b, V] at min_len - 1
        ctx.enable_decode_mode()
        if par.last and params.repetition_penalty != 1.0:
            V = logits.shape[-1]
            seen = torch.zeros((b, V), dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                ids = torch.as_tensor(list(p), dtype=torch.long, device=device)
                seen[i, ids[ids < V]] = True
        nxt = torch.empty(b, dtype=torch.long, device=device)
        for t in range(min_len, total):
            if par.last:
                nxt.copy_(sample(logits, params, gen, seen))
            par.broadcast(nxt)
            # rows that produce a new token at position t (past their prompt, not finished)
            active = (lens_t <= t) & ~done
            step_tok = torch.where(active, nxt, tokens[:, t])
            tokens[:, t] = step_tok
            slot = (t - lens_t).clamp(0, max_new - 1)  # [b] index into the outputs
            out_tokens[rows, slot] = torch.where(active, nxt, out_tokens[rows, slot])
            if out_logp is not None and par.last:
                lp = torch.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
                out_logp[rows, slot] = torch.where(active, lp, out_logp[rows, slot])
            if seen is not None:
                col = nxt.unsqueeze(-1)  # [b, 1]
                seen.scatter_(1, col, seen.gather(1, col) | active.unsqueeze(-1))
            n_gen += active.long()
            finished = active & (n_gen >= max_new)
            if stop_ids.numel():
                hit = active & torch.isin(nxt, stop_ids)
                reason = torch.where(hit, 1, reason)
                finished |= hit
            if stop_fn is not None:
                for i in (active & ~finished).nonzero().flatten().tolist():
                    if stop_fn(i, out_tokens[i, : int(n_gen[i])].tolist()):
                        reason[i] = 2
                        finished[i] = True
            done |= finished
            if t == total - 1 or ((t - min_len) % check_every == check_every - 1
                                  and bool(done.all())):
                break
            logits = forward(tokens[:, t:t + 1], positions[:, t:t + 1])
    if out_logp is not None and par.pp > 1:
        par.broadcast(out_logp)
    return GenerationOutput(out_tokens.cpu(), n_gen.cpu(),
                            out_logp.cpu() if out_logp is not None else None, lens_t.cpu(),
                            [_REASONS[c] for c in reason.tolist()])


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
