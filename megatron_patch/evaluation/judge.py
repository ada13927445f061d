"""Single-answer grading by a judge model over any OpenAI-compatible chat-completions endpoint.

The protocol is MT-Bench's (single-answer grading): the judge gets a system message and one user
message holding the question (for turn 2: the whole two-turn conversation, only the second reply
being graded), the assistant's reply and, for the reference categories (math, reasoning, coding),
a reference solution; it writes a short explanation and then a rating from 1 to 10 in the form
``[[N]]``. The prompt wording is this project's own; only the protocol (what the judge sees, the
``[[N]]`` rating format) follows MT-Bench.

Scores: the last ``[[N]]`` in the reply (N from 1 to 10, decimals allowed), else the last ``[N]``;
anything else is "no score". The HTTP client (stdlib ``urllib``) retries with exponential backoff on
HTTP errors (except 400/401/403/404/422, which a retry cannot fix), timeouts, connection errors,
replies that are not the OpenAI shape, and replies without a score; after the last try the judgment
is FAILED with its reason, never a score.

Judgments are cached in a jsonl file (one record per judgment, appended and flushed as each
finishes) keyed by (model, question id, turn, judge model, hash of the judge prompt): a rerun asks
only what is missing, and a changed answer or prompt is judged again. FAILED records are kept in
the file but asked again on a rerun.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from megatron_patch.evaluation.questions import (REFERENCE_CATEGORIES, EvaluationError,
                                                 Question)

# ----------------------------------------------------------------------------------- prompts
# Written for this project (not taken from MT-Bench/FastChat); the protocol is the same.

SYSTEM_PROMPT = ("You grade the replies of AI assistants. Be fair, consistent and strict about "
                 "facts; judge only what is written, not who wrote it.")

_RATING_RULE = ("First write a short explanation of your assessment (a few sentences). Then give "
                "your rating from 1 (worthless) to 10 (excellent) on its own line, written exactly "
                "as a number inside double square brackets, for example: Rating: [[6]]")

_GENERAL = ("Judge how good the assistant's reply to the user is. Look at helpfulness, "
            "relevance, correctness, depth, creativity and level of detail. A longer reply is not "
            "better for being longer.")

_WITH_REFERENCE = ("Judge how good the assistant's reply to the user is. A reference solution is "
                   "given: compare the reply with it and point out every mistake the reply makes. "
                   "Correctness counts most.")

SINGLE_GENERAL = """{task}
{rule}

### Question
{question}

### Assistant's reply
{answer}
### End of reply"""

SINGLE_REFERENCE = """{task}
{rule}

### Question
{question}

### Reference solution
{ref_answer}

### Assistant's reply
{answer}
### End of reply"""

_MULTI_HEAD = """Below is a two-turn conversation between a user and an AI assistant. \
Grade only the assistant's SECOND reply; the first turn is there as context.
{task}
{rule}
"""

_CONVERSATION = """
### Conversation
[User, turn 1]
{question_1}

[Assistant, turn 1]
{answer_1}

[User, turn 2]
{question_2}

[Assistant, turn 2 - the reply to grade]
{answer_2}
### End of conversation"""

MULTI_GENERAL = _MULTI_HEAD + _CONVERSATION

MULTI_REFERENCE = _MULTI_HEAD + """
### Reference solutions
[Turn 1]
{ref_answer_1}

[Turn 2]
{ref_answer_2}
""" + _CONVERSATION


def uses_reference(q: Question, reference_categories: Sequence[str] = REFERENCE_CATEGORIES) -> bool:
    return q.reference is not None and q.category_key in {c.lower() for c in reference_categories}


def judge_messages(q: Question, answers: Sequence[str], turn: int,
                   reference_categories: Sequence[str] = REFERENCE_CATEGORIES) -> List[dict]:
    """The chat messages that ask the judge to grade the reply of ``turn`` (1 or 2)."""
    ref = uses_reference(q, reference_categories)
    task = _WITH_REFERENCE if ref else _GENERAL
    refs = list(q.reference or []) + [""] * 2
    if turn == 1:
        user = (SINGLE_REFERENCE if ref else SINGLE_GENERAL).format(
            task=task, rule=_RATING_RULE, question=q.turns[0], answer=answers[0],
            ref_answer=refs[0])
    elif turn == 2:
        if ref and not refs[1]:
            refs[1] = "(none given)"
        user = (MULTI_REFERENCE if ref else MULTI_GENERAL).format(
            task=task, rule=_RATING_RULE, question_1=q.turns[0], answer_1=answers[0],
            question_2=q.turns[1], answer_2=answers[1], ref_answer_1=refs[0],
            ref_answer_2=refs[1])
    else:
        raise ValueError(f"turn must be 1 or 2, got {turn}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def prompt_hash(messages: Sequence[dict]) -> str:
    """A short hash of the judge prompt (part of the cache key)."""
    blob = json.dumps(list(messages), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------- scores

_NUM = r"\s*([0-9]+(?:\.[0-9]+)?)\s*"
_DOUBLE = re.compile(r"\[\[" + _NUM + r"\]\]")
_SINGLE = re.compile(r"(?<!\[)\[" + _NUM + r"\](?!\])")


def parse_score(text: Optional[str]) -> Optional[float]:
    """The rating in a judge reply: the last ``[[N]]``, else the last ``[N]``, with 1 <= N <= 10
    (decimals allowed); None when there is none (an out-of-range number is no score)."""
    if not text:
        return None
    for pattern in (_DOUBLE, _SINGLE):
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if 1.0 <= value <= 10.0 else None
    return None


# ----------------------------------------------------------------------------------- client

NOT_RETRIED = (400, 401, 403, 404, 422)  # a retry cannot fix these


class JudgeError(Exception):
    """One failed try: ``reason`` is what gets recorded, ``retry_after`` a server hint (s)."""

    def __init__(self, reason: str, retryable: bool = True, retry_after: Optional[float] = None):
        super().__init__(reason)
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


@dataclasses.dataclass
class JudgeConfig:
    base_url: str
    model: str
    api_key: Optional[str] = None
    temperature: float = 0.0
    max_tokens: int = 1024  # 0: not sent (the endpoint's default)
    timeout: float = 120.0
    retries: int = 4  # tries after the first
    backoff: float = 2.0  # seconds before the first retry, doubled each time
    max_backoff: float = 60.0

    def endpoint(self) -> str:
        url = self.base_url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def delay(self, attempt: int, hint: Optional[float] = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based); a small jitter."""
        d = min(self.backoff * (2 ** attempt), self.max_backoff)
        if hint is not None:
            d = max(d, min(hint, self.max_backoff))
        return d * (1.0 + 0.1 * random.random())


def chat_completion(cfg: JudgeConfig, messages: Sequence[dict]) -> str:
    """One request; the reply text, or JudgeError."""
    req_body = {"model": cfg.model, "messages": list(messages), "temperature": cfg.temperature}
    if cfg.max_tokens > 0:  # 0: the endpoint's default
        req_body["max_tokens"] = cfg.max_tokens
    body = json.dumps(req_body).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if cfg.api_key:
        headers["Authorization"] = f"Bearer {cfg.api_key}"
    req = urllib.request.Request(cfg.endpoint(), data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            detail = e.read().decode("utf-8", "replace").strip().replace("\n", " ")[:200]
        except Exception:  # noqa: BLE001
            pass
        hint = None
        try:
            hint = float(e.headers.get("Retry-After")) if e.headers else None
        except (TypeError, ValueError):
            hint = None
        raise JudgeError(f"HTTP {e.code}" + (f": {detail}" if detail else ""),
                         retryable=e.code not in NOT_RETRIED, retry_after=hint) from None
    except (socket.timeout, TimeoutError) as e:
        raise JudgeError(f"timeout after {cfg.timeout:g}s ({e})") from None
    except urllib.error.URLError as e:
        reason = e.reason
        kind = "timeout" if isinstance(reason, (socket.timeout, TimeoutError)) else \
            "connection error"
        raise JudgeError(f"{kind}: {reason}") from None
    except (ConnectionError, OSError, http.client.HTTPException) as e:
        raise JudgeError(f"connection error: {type(e).__name__}: {e}") from None
    try:
        data = json.loads(raw)
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("content is not a string")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeError(f"malformed response ({type(e).__name__}: {e}): "
                         f"{raw[:200].decode('utf-8', 'replace')!r}") from None
    return content


@dataclasses.dataclass
class Verdict:
    score: Optional[float]  # None = FAILED
    judgment: str  # the judge's last reply ('' when none came)
    tries: int
    error: Optional[str] = None  # why it FAILED


def ask_judge(cfg: JudgeConfig, messages: Sequence[dict],
              send: Callable[[JudgeConfig, Sequence[dict]], str] = chat_completion,
              sleep: Callable[[float], None] = time.sleep) -> Verdict:
    """Ask until a reply has a score, up to ``1 + cfg.retries`` tries with backoff between them."""
    last_reply, error = "", "no try made"
    tries = 0
    for attempt in range(cfg.retries + 1):
        tries += 1
        hint = None
        try:
            reply = send(cfg, messages)
        except JudgeError as e:
            error, hint = e.reason, e.retry_after
            if not e.retryable:
                break
        else:
            last_reply = reply
            score = parse_score(reply)
            if score is not None:
                return Verdict(score, reply, tries)
            error = "no [[rating]] in the judge's reply"
        if attempt < cfg.retries:
            sleep(cfg.delay(attempt, hint))
    return Verdict(None, last_reply, tries, error)


# ----------------------------------------------------------------------------------- cache

def safe_name(name: str) -> str:
    """A file name for a model name ('org/model:tag' -> 'org_model_tag')."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return out or "judge"


def cache_key(model: str, question_id, turn: int, judge_model: str, phash: str) -> str:
    return json.dumps([model, str(question_id), int(turn), judge_model, phash])


class JudgmentCache:
    """The judgments of one judge model: ``<out>/judgments/<judge_model>.jsonl``, appended and
    flushed per judgment (thread-safe). A torn last line (an interrupted write) is ignored; a later
    record of the same key wins."""

    def __init__(self, path: str):
        self.path = path
        self.records: Dict[str, dict] = {}
        self._lock = threading.Lock()
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        key = cache_key(rec["model"], rec["question_id"], rec["turn"],
                                        rec["judge_model"], rec["prompt_hash"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    self.records[key] = rec
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = None

    def done(self, key: str) -> Optional[dict]:
        """The cached record of a successful judgment, or None (missing or FAILED)."""
        rec = self.records.get(key)
        return rec if rec is not None and rec.get("score") is not None else None

    def add(self, rec: dict) -> None:
        key = cache_key(rec["model"], rec["question_id"], rec["turn"], rec["judge_model"],
                        rec["prompt_hash"])
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with self._lock:
            if self._f is None:
                needs_newline = False
                if os.path.isfile(self.path) and os.path.getsize(self.path):
                    with open(self.path, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        needs_newline = f.read(1) != b"\n"
                self._f = open(self.path, "a", encoding="utf-8")
                if needs_newline:  # start after a torn line
                    self._f.write("\n")
            self._f.write(line)
            self._f.flush()
            self.records[key] = rec

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


# ----------------------------------------------------------------------------------- runs

@dataclasses.dataclass
class Task:
    model: str
    question: Question
    turn: int
    messages: List[dict]
    key: str
    phash: str


def make_tasks(model: str, questions: Iterable[Question], answers: Dict[str, List[str]],
               judge_model: str, reference_categories: Sequence[str] = REFERENCE_CATEGORIES
               ) -> List[Task]:
    """One task per (question, turn) the model has answered."""
    out = []
    for q in questions:
        ans = answers.get(q.key)
        if ans is None:
            continue
        for turn in range(1, min(len(q.turns), len(ans)) + 1):
            msgs = judge_messages(q, ans, turn, reference_categories)
            ph = prompt_hash(msgs)
            out.append(Task(model, q, turn, msgs, cache_key(model, q.key, turn, judge_model, ph),
                            ph))
    return out


def run_judgments(cfg: JudgeConfig, tasks: Sequence[Task], cache: JudgmentCache, *,
                  parallel: int = 1, log=print,
                  send: Callable[[JudgeConfig, Sequence[dict]], str] = chat_completion,
                  sleep: Callable[[float], None] = time.sleep) -> Dict[str, int]:
    """Judge every task not already in the cache (``parallel`` requests at a time); each result is
    written to the cache as soon as it is in. Returns counts: cached, asked, scored, failed."""
    todo = [t for t in tasks if cache.done(t.key) is None]
    counts = {"cached": len(tasks) - len(todo), "asked": len(todo), "scored": 0, "failed": 0}
    if not todo:
        return counts

    def one(t: Task) -> dict:
        v = ask_judge(cfg, t.messages, send=send, sleep=sleep)
        rec = {"model": t.model, "question_id": t.question.question_id, "turn": t.turn,
               "category": t.question.category, "judge_model": cfg.model,
               "prompt_hash": t.phash, "score": v.score, "judgment": v.judgment,
               "tries": v.tries, "tstamp": time.time()}
        if v.score is None:
            rec["error"] = v.error
        cache.add(rec)
        return rec

    done = 0
    pool = ThreadPoolExecutor(max_workers=max(1, int(parallel)))
    try:
        futures = [pool.submit(one, t) for t in todo]
        for fut in as_completed(futures):
            rec = fut.result()
            done += 1
            if rec["score"] is None:
                counts["failed"] += 1
                log(f"judge: FAILED {rec['model']} question {rec['question_id']} turn "
                    f"{rec['turn']} after {rec['tries']} tries: {rec['error']}")
            else:
                counts["scored"] += 1
            if done % 20 == 0 or done == len(todo):
                log(f"judge: {done}/{len(todo)} judgments ({counts['failed']} failed)")
    finally:  # on Ctrl-C: drop the queued requests (what is done is in the cache already)
        pool.shutdown(wait=True, cancel_futures=True)
    return counts


def check_config(cfg: JudgeConfig) -> None:
    if not cfg.base_url:
        raise EvaluationError("no judge endpoint: pass --judge-base-url or set OPENAI_BASE_URL "
                              "(e.g. http://127.0.0.1:8000/v1)")
    if not cfg.base_url.startswith(("http://", "https://")):
        raise EvaluationError(f"judge base URL {cfg.base_url!r} must start with http:// or "
                              "https://")
    if not cfg.model:
        raise EvaluationError("no judge model: pass --judge-model (the name the endpoint serves)")
    if cfg.retries < 0 or cfg.backoff < 0 or cfg.timeout <= 0:
        raise EvaluationError("--judge-retries and --judge-backoff must be >= 0, "
                              "--judge-timeout > 0")

