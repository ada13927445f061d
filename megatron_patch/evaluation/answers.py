"""Two-turn MT-Bench answers from a Megatron checkpoint, with the in-process generation library.

For each batch of questions, turn 1 is generated from the chat template rendering of ``[system?,
user: turn 1]`` plus the generation prompt; turn 2 from ``[system?, user: turn 1, assistant: the
model's turn-1 answer, user: turn 2]``. Questions are batched (``batch_size`` rows per ``generate``
call, prompts of different lengths left-padded), grouped by their sampling temperature
(``temperature``, or a per-category value). Temperature 0 is greedy. A row stops at the tokenizer's
eos / end-of-turn tokens, at the default template's role markers (when the tokenizer has no chat
template of its own), or after ``max_new_tokens``. Prompts longer than ``seq_length -
max_new_tokens`` tokens are cut from the left with a warning.

Answers go to ``<out>/answers/<model>.jsonl``, one record per question, appended and flushed as each
question's turns are done, in the answer format MT-Bench tools read::

    {"question_id": 81, "answer_id": "...", "model_id": "sft", "category": "writing",
     "choices": [{"index": 0, "turns": ["turn-1 answer", "turn-2 answer"]}], "tstamp": ...,
     "generation": {"checkpoint": ..., "temperature": 0.0, "max_new_tokens": 512}}

With ``tp``/``pp`` > 1 the command runs under torchrun as TP x PP processes: every rank generates the
same batches in lockstep and rank 0 writes. A rerun skips the question ids already in the file (an interrupted last line is ignored, and cut
off by the next append).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import time
import uuid
from typing import Dict, List, Optional, Sequence

from megatron_patch.evaluation.questions import EvaluationError, Question, answer_turns

DEFAULT_TEMPLATE_MARKERS = ("<|user|>", "<|system|>", "<|assistant|>")

# the sampling temperatures MT-Bench uses per category (--mt-bench-temperatures)
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                         "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}


@dataclasses.dataclass
class GenerationSettings:
    tokenizer: str = "-"  # '-': the checkpoint's tokenizer files
    batch_size: int = 8
    max_new_tokens: int = 512
    seq_length: int = 0  # prompt + answer tokens; 0: the model's max_position_embeddings (or 2048)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    category_temperature: Dict[str, float] = dataclasses.field(default_factory=dict)
    system_prompt: Optional[str] = None
    seed: int = 1234
    precision: str = "auto"
    tp: int = 1  # tensor / pipeline parallel: run under torchrun with TP x PP processes
    pp: int = 1

    def temperature_for(self, q: Question) -> float:
        return float(self.category_temperature.get(q.category_key, self.temperature))


def load_answers(path: str) -> Dict[str, List[str]]:
    """question id (str) -> answer turns, from an answer file ({} when there is none). A bad line
    is an error naming file:line, except a torn last line (an interrupted write), which is
    ignored."""
    out: Dict[str, List[str]] = {}
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError as e:
            if i == last:
                continue
            raise EvaluationError(f"{where}: not a JSON object ({e})") from None
        if "question_id" not in obj:
            raise EvaluationError(f"{where}: no 'question_id'")
        out[str(obj["question_id"])] = answer_turns(obj, where)
    return out


def _append(path: str, rec: dict) -> None:
    """Append one record and flush; a torn last line (an interrupted write) is cut off first. A
    complete last record without its newline (a file written by another tool) is kept."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.isfile(path) and os.path.getsize(path):
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                start = data.rfind(b"\n") + 1
                try:
                    complete = isinstance(json.loads(data[start:].decode("utf-8")), dict)
                except ValueError:  # also UnicodeDecodeError
                    complete = False
                if complete:
                    f.write(b"\n")
                else:
                    f.truncate(start)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()


def render_prompt(tokenizer, history: Sequence[dict], system_prompt: Optional[str],
                  tokenize: bool = False):
    """The chat template text of the conversation so far plus the generation prompt (its ids
    with ``tokenize``: the template's special tokens as tokens, not text)."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        list(history)
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=tokenize)


def generate_answers(model_name: str, ckpt: str, questions: Sequence[Question], path: str,
                     settings: GenerationSettings, log=print) -> int:
    """Generate the answers ``path`` lacks; returns how many questions were answered now."""
    done = load_answers(path)
    todo = [q for q in questions if q.key not in done]
    if not todo:
        log(f"answers: {model_name}: all {len(questions)} questions already answered in {path}")
        return 0
    import torch

    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.cli import (cut_at_stop, fit_prompt, stop_token_ids,
                                               wants_bos)
    from megatron_patch.generation.loader import (GenerationSetupError, load_for_generation,
                                                  load_tokenizer, resolve_precision)

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != settings.tp * settings.pp:
        raise EvaluationError(f"{world} processes for TP={settings.tp} x PP={settings.pp}: run "
                              f"under torchrun --nproc-per-node {settings.tp * settings.pp}")
    try:
        tokenizer = load_tokenizer(settings.tokenizer, ckpt, settings.tp)
        lm = load_for_generation(ckpt, tp=settings.tp, pp=settings.pp,
                                 precision=resolve_precision(ckpt, settings.precision), flash=True,
                                 seed=settings.seed, log=log)
    except GenerationSetupError as e:
        raise EvaluationError(f"model {model_name}: {e}") from None
    writer = dist.get_rank() == 0  # every rank generates (in lockstep), rank 0 writes
    seq_len = settings.seq_length or lm.max_position_embeddings or 2048
    max_prompt = seq_len - settings.max_new_tokens
    if max_prompt < 1:
        raise EvaluationError(f"sequence length {seq_len} leaves no room for a prompt before "
                              f"{settings.max_new_tokens} new tokens")
    add_bos = wants_bos(tokenizer, "auto")
    stop_ids = stop_token_ids(tokenizer, chat=True)
    stops = [] if getattr(tokenizer, "chat_template", None) else list(DEFAULT_TEMPLATE_MARKERS)

    def stop_fn(row, ids):
        return cut_at_stop(tokenizer.detokenize(ids), stops)[1]

    def decode(out, r) -> str:
        ids = out.row(r)
        if ids and out.finish_reasons[r] == "stop_token" and ids[-1] in stop_ids:
            ids = ids[:-1]
        text = tokenizer.detokenize(ids)
        return (cut_at_stop(text, stops)[0] if stops else text).strip()

    def warn(msg):
        log(f"answers: {model_name}: {msg}")

    # temperature groups, each in file order; batches never mix temperatures
    groups: Dict[float, List[Question]] = {}
    for q in todo:
        groups.setdefault(settings.temperature_for(q), []).append(q)
    t0, n_done, batch_no = time.time(), 0, 0
    log(f"answers: {model_name}: generating {len(todo)} of {len(questions)} questions from {ckpt}")
    for temp, qs in groups.items():
        for start in range(0, len(qs), settings.batch_size):
            batch = qs[start:start + settings.batch_size]
            histories: List[List[dict]] = [[] for _ in batch]
            replies: List[List[str]] = [[] for _ in batch]
            for turn in range(max(len(q.turns) for q in batch)):
                rows = [i for i, q in enumerate(batch) if turn < len(q.turns)]
                prompts = []
                for i in rows:
                    histories[i].append({"role": "user", "content": batch[i].turns[turn]})
                    prompts.append(fit_prompt(
                        tokenizer, render_prompt(tokenizer, histories[i], settings.system_prompt,
                                                 tokenize=True),
                        add_bos=add_bos, max_prompt=max_prompt, warn=warn, index=len(prompts)))
                params = SamplingParams(max_new_tokens=settings.max_new_tokens,
                                        greedy=temp <= 0, temperature=temp if temp > 0 else 1.0,
                                        top_k=max(settings.top_k, 0), top_p=settings.top_p,
                                        seed=settings.seed + batch_no, stop_token_ids=stop_ids,
                                        return_logprobs=False)
                batch_no += 1
                out = generate(lm.model, prompts, params, pad_id=int(tokenizer.pad or 0),
                               vocab_size=lm.vocab_size, stop_fn=stop_fn if stops else None)
                for r, i in enumerate(rows):
                    text = decode(out, r)
                    replies[i].append(text)
                    histories[i].append({"role": "assistant", "content": text})
            for q, turns in zip(batch, replies):
                if not writer:
                    continue
                _append(path, {"question_id": q.question_id, "answer_id": uuid.uuid4().hex[:22],
                               "model_id": model_name, "category": q.category,
                               "choices": [{"index": 0, "turns": turns}], "tstamp": time.time(),
                               "generation": {"checkpoint": os.path.abspath(ckpt),
                                              "temperature": temp,
                                              "max_new_tokens": settings.max_new_tokens}})
            n_done += len(batch)
            log(f"answers: {model_name}: {n_done}/{len(todo)} questions "
                f"({time.time() - t0:.1f}s)")
    del lm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n_done
