"""Continuous request batching for the server: many clients, one model, one ``generate`` at a time.

Rank 0 (the HTTP process) queues ``Job`` s; ``Scheduler.serve`` takes the oldest waiting job and
every waiting job compatible with it (same sampling settings, up to ``max_batch_size`` rows, and
``longest prompt + largest max_tokens <= seq_length``) and runs them as one left-padded batch through
``megatron_patch.generation.generate``. Rows differ in prompt, ``max_tokens``, stop strings and
stop tokens: the engine gets the batch's largest ``max_tokens`` and no stop tokens, and the
per-token ``stop_fn(row, ids)`` ends each row by its own rules (its end-of-turn / eos ids, its stop
strings, its ``max_tokens``). The same callback streams each row's new text to its client as it is
produced and finishes a row's response the moment the row stops. Greedy rows therefore give the
same tokens alone or in any batch (left padding and masks make a padded row compute what its
unpadded prompt computes; see ``generation/engine.py``).

Compatibility: greedy requests (temperature 0 or top_k 1) batch with greedy requests of the same
repetition penalty; sampled requests batch with the same (temperature, top_k, top_p, penalty), drawn
with a seed the server derives from ``--seed``; a sampled request that names its own ``seed`` runs in
a batch of its own, so that the same seed gives the same text.

Tensor / pipeline parallel: rank 0 broadcasts each batch (prompt ids, sampling params, per-row
rules) with ``broadcast_object_list``; the other ranks (``Scheduler.follow``) run the same
``generate`` in lockstep with the same ``stop_fn`` rules, which depend only on the token ids. A client
that disconnects is cancelled at once in a world of one (its row stops); with TP/PP > 1 its row runs
on to its own limits and the output is dropped (stopping it on rank 0 alone would break lockstep).
An idle rank 0 broadcasts a no-op every ``HEARTBEAT_S`` so waiting ranks never hit the collective
timeout; shutdown is one broadcast ``stop``.
"""
from __future__ import annotations

import collections
import dataclasses
import queue
import random
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from megatron_patch.generation.text import CONTEXT_TOKENS, decode_response
from megatron_patch.serve import protocol
from megatron_patch.serve.protocol import APIError

HEARTBEAT_S = 60.0
POLL_S = 0.5


@dataclasses.dataclass(eq=False)
class Job:
    """One request on rank 0: what to generate and where its events go."""

    rid: str
    kind: str  # "chat" | "completion"
    prompt_ids: List[int]
    max_tokens: int
    params: protocol.Params
    stop_ids: List[int]
    model: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    # ("delta", text) while streaming, then ("end", result dict) or ("error", APIError)
    events: "queue.Queue" = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.time)
    stream_text: Optional[protocol.StreamText] = None

    def __post_init__(self):
        self.stream_text = protocol.StreamText(self.params.stop)

    @property
    def context(self) -> List[int]:
        """The prompt tokens a response is decoded after (``generation.text.decode_response``):
        a completion continues its prompt's text; a chat message starts its own."""
        return self.prompt_ids if self.kind == "completion" else []

    @property
    def key(self):
        p = self.params
        if p.greedy:
            return ("greedy", p.repetition_penalty)
        if p.seed is not None:
            return ("seeded", id(self))  # a batch of its own
        return ("sample", p.temperature, p.top_k, p.top_p, p.repetition_penalty)

    def cancel(self):
        self.cancelled.set()


def sampling_kwargs(p: protocol.Params, max_new: int, seed: Optional[int]) -> Dict[str, Any]:
    """``SamplingParams`` fields of a batch (stop tokens are handled per row by the scheduler)."""
    if p.greedy:
        return dict(max_new_tokens=max_new, greedy=True, repetition_penalty=p.repetition_penalty,
                    return_logprobs=False)
    return dict(max_new_tokens=max_new, temperature=p.temperature, top_k=p.top_k,
                top_p=p.top_p if p.top_p < 1 else 0.0, repetition_penalty=p.repetition_penalty,
                seed=p.seed if p.seed is not None else seed, return_logprobs=False)


class Scheduler:
    def __init__(self, model, tokenizer, *, vocab_size: int, seq_length: int,
                 max_batch_size: int = 8, seed: int = 1234, pad_id: int = 0,
                 batch_wait_s: float = 0.005, log: Callable[..., None] = print):
        import torch.distributed as dist

        self.model, self.tok = model, tokenizer
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.max_batch_size = max(1, int(max_batch_size))
        self.pad_id = pad_id
        self.batch_wait_s = batch_wait_s
        self.log = log
        self.dist = dist
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1
        self._rng = random.Random(seed)
        self._queue: "queue.Queue[Job]" = queue.Queue()
        self._pending: "collections.deque[Job]" = collections.deque()
        self._closed = threading.Event()
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "cancelled": 0,
                      "generated_tokens": 0}

    # ------------------------------------------------------------------------- rank 0: queueing
    def submit(self, job: Job) -> None:
        if self._closed.is_set():
            raise APIError(503, "the server is shutting down")
        self._queue.put(job)

    def waiting(self) -> int:
        return self._queue.qsize() + len(self._pending)

    def _drain(self) -> None:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def _next_batch(self, timeout: float) -> Optional[List[Job]]:
        if not self._pending:
            try:
                self._pending.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return None
            if self.batch_wait_s > 0 and self.max_batch_size > 1:
                # requests sent at the same moment arrive a few milliseconds apart
                time.sleep(self.batch_wait_s)
        self._drain()
        for j in [j for j in self._pending if j.cancelled.is_set()]:
            self._pending.remove(j)
            self._dropped(j)
        if not self._pending:
            return None
        head = self._pending[0]
        batch, longest, most = [head], len(head.prompt_ids), head.max_tokens
        for j in list(self._pending)[1:]:
            if len(batch) >= self.max_batch_size:
                break
            if j.key != head.key:
                continue
            lo, mo = max(longest, len(j.prompt_ids)), max(most, j.max_tokens)
            if lo + mo > self.seq_length:
                continue  # fits alone (checked on arrival), not beside this batch: next time
            batch.append(j)
            longest, most = lo, mo
        for j in batch:
            self._pending.remove(j)
        return batch

    def _dropped(self, job: Job) -> None:
        self.stats["cancelled"] += 1
        self.log(f"[serve] {job.rid}: client disconnected, request cancelled")

    # ------------------------------------------------------------------------- all ranks
    def _bcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def _execute(self, spec: Dict[str, Any], jobs: Optional[List[Job]] = None):
        """Run one batch; on rank 0 ``jobs`` get their events. Returns (out, reasons)."""
        from megatron_patch.generation import SamplingParams, generate

        rows = spec["rows"]
        reasons: List[Optional[str]] = [None] * len(rows)
        stop_sets = [set(r["stop_ids"]) for r in rows]
        lockstep = self.world > 1

        def stop_fn(i: int, ids: List[int]) -> bool:
            r = rows[i]
            if ids[-1] in stop_sets[i]:
                reasons[i] = "stop_token"
            elif r["stops"] and protocol.cut_at_stop(
                    decode_response(self.tok, r["context"], ids), r["stops"])[1]:
                reasons[i] = "stop"
            elif len(ids) >= r["max_tokens"]:
                reasons[i] = "length"
            else:
                if jobs is not None and self._progress(jobs[i], ids) and not lockstep:
                    reasons[i] = "cancelled"
                    self._finish(jobs[i], ids, "cancelled")
                    return True
                return False
            if jobs is not None:
                self._finish(jobs[i], ids, reasons[i])
            return True

        params = SamplingParams(**spec["params"])
        out = generate(self.model, spec["prompts"], params, pad_id=self.pad_id,
                       vocab_size=self.vocab_size, max_sequence_length=self.seq_length,
                       stop_fn=stop_fn)
        for i in range(len(rows)):
            if reasons[i] is None:  # ended by the engine at the batch's max_new_tokens
                ids = out.row(i)
                reasons[i] = "stop_token" if ids and ids[-1] in stop_sets[i] else "length"
                if jobs is not None:
                    self._finish(jobs[i], ids, reasons[i])
        return out, reasons

    # ------------------------------------------------------------------------- rank 0: results
    def _progress(self, job: Job, ids: List[int]) -> bool:
        """Stream the new text of a running row; True when its client has gone."""
        if job.cancelled.is_set():
            return True
        if job.params.stream:
            try:
                delta = job.stream_text.update(decode_response(self.tok, job.context, ids))
                if delta:
                    job.events.put(("delta", delta))
            except Exception as e:  # noqa: BLE001  (a bad row never stops the batch)
                self.log(f"[serve] {job.rid}: stream error {e!r}")
        return False

    def _finish(self, job: Job, ids: List[int], reason: str) -> None:
        try:
            n_completion = len(ids)
            self.stats["generated_tokens"] += n_completion
            if job.cancelled.is_set() or reason == "cancelled":
                self._dropped(job)
                job.events.put(("error", APIError(499, "cancelled")))
                return
            keep = ids[:-1] if reason == "stop_token" else ids
            text = decode_response(self.tok, job.context, keep)
            text, hit = protocol.cut_at_stop(text, job.params.stop)
            finish = "length" if reason == "length" and not hit else "stop"
            if job.params.stream:
                delta = job.stream_text.update(text, final=True)
                if delta:
                    job.events.put(("delta", delta))
            result = {"text": text, "finish_reason": finish,
                      "prompt_tokens": len(job.prompt_ids), "completion_tokens": n_completion}
            job.events.put(("end", result))
            self.log(f"[serve] {job.rid}: {len(job.prompt_ids)} prompt + {n_completion} completion "
                     f"tokens, {finish}, {time.time() - job.submitted:.2f}s")
        except Exception as e:  # noqa: BLE001
            job.events.put(("error", APIError(500, f"internal error: {e}")))

    def _spec(self, batch: List[Job]) -> Dict[str, Any]:
        most = max(j.max_tokens for j in batch)
        seed = self._rng.randrange(2 ** 31)
        return {"op": "run", "prompts": [list(j.prompt_ids) for j in batch],
                "params": sampling_kwargs(batch[0].params, most, seed),
                "rows": [{"max_tokens": j.max_tokens, "stops": list(j.params.stop),
                          "stop_ids": list(j.stop_ids),
                          "context": list(j.context[-CONTEXT_TOKENS:])} for j in batch]}

    def serve(self, stop: threading.Event) -> None:
        """Rank 0: run batches until ``stop`` is set; then release the other ranks."""
        idle_since = time.time()
        try:
            while not stop.is_set():
                batch = self._next_batch(POLL_S)
                if batch is None:
                    if self.world > 1 and time.time() - idle_since > HEARTBEAT_S:
                        self._bcast({"op": "noop"})
                        idle_since = time.time()
                    continue
                spec = self._spec(batch)
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
                try:
                    self._bcast(spec)
                    self._execute(spec, batch)
                except Exception as e:  # noqa: BLE001  (the server keeps serving)
                    self.log(f"[serve] batch of {len(batch)} failed: {e!r}")
                    for j in batch:
                        j.events.put(("error", APIError(500, f"generation failed: {e}")))
                idle_since = time.time()
        finally:
            self._closed.set()
            self._drain()
            for j in self._pending:
                j.events.put(("error", APIError(503, "the server is shutting down")))
            self._pending.clear()
            try:
                self._bcast({"op": "stop"})
            except Exception as e:  # noqa: BLE001
                self.log(f"[serve] could not stop the other ranks: {e!r}")

    def follow(self) -> None:
        """Ranks other than 0: run what rank 0 broadcasts until it says stop."""
        while True:
            spec = self._bcast(None)
            op = spec.get("op") if isinstance(spec, dict) else None
            if op == "stop":
                return
            if op == "run":
                try:
                    self._execute(spec)
                except Exception as e:  # noqa: BLE001  (rank 0 fails the same way and goes on)
                    self.log(f"[serve] rank {self.rank}: batch failed: {e!r}")
