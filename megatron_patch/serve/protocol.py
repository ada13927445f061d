"""The OpenAI wire format: request validation, response and stream-chunk shapes, error objects.

Pure Python (no torch, no megatron), so it can be tested and reused without a model.

- ``parse_json(raw)`` -> the request object (400 on malformed JSON or a non-object body);
- ``parse_chat(body)`` / ``parse_completion(body)`` -> ``(messages | prompt text, Params)``, raising
  ``APIError`` (400, with the offending ``param``) on a missing or mistyped field;
- ``fit_max_tokens(n_prompt, requested, seq_length, default)`` -> the number of new tokens, or a 400
  ``context_length_exceeded`` that states the limits (prompts are never truncated);
- ``chat_response`` / ``completion_response`` / ``chat_chunk`` / ``completion_chunk`` build the
  response objects; ``sse(obj)`` one Server-Sent Events frame; ``StreamText`` turns the growing text
  of a row into deltas that never show a partial UTF-8 character or the start of a stop string.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant", "tool", "developer")


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
             411: "invalid_request_error", 413: "invalid_request_error",
             501: "invalid_request_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, type: Optional[str] = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type or self.TYPES.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------------------- requests

@dataclasses.dataclass
class Params:
    """The generation settings of one request (already validated)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None  # None: DEFAULT_MAX_TOKENS capped by the room left
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: List[str] = dataclasses.field(default_factory=list)
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False

    @property
    def greedy(self) -> bool:
        """temperature 0, top_k 1 or top_p 0 (only the most likely token is left) pick the argmax."""
        return self.temperature == 0 or self.top_k == 1 or self.top_p == 0


def parse_json(raw: bytes) -> Dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _number(body, name, default, *, lo=None, hi=None, lo_open=False, integer=False):
    v = body.get(name)
    if v is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got "
                  f"{json.dumps(v)[:50]}", name)
    if v != v or v in (float("inf"), float("-inf")):
        raise bad(f"'{name}' must be a finite number", name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"'{name}' must be <= {hi}, got {v}", name)
    return v


def parse_params(body: Dict[str, Any]) -> Params:
    """The fields both endpoints share. ``n`` other than 1, ``best_of`` > 1 and log-probs are
    refused (400) rather than silently ignored."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    n = _number(body, "n", 1, integer=True)
    if n != 1:
        raise bad(f"only n=1 is supported, got n={n}", "n")
    if _number(body, "best_of", 1, integer=True) != 1:
        raise bad("only best_of=1 is supported", "best_of")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("log-probabilities are not supported by this server", "logprobs")
    if body.get("echo") not in (None, False):
        raise bad("echo is not supported by this server", "echo")
    max_tokens = body.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        name = "max_tokens"
    max_tokens = _number(body, name, None, lo=1, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = list(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(stop) > 16:
        raise bad("at most 16 stop strings", "stop")
    stop = [s for s in stop if s]
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        include_usage = bool(opts.get("include_usage", False))
    seed = _number(body, "seed", None, integer=True)
    return Params(
        model=model,
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", 1.0, lo=0)),
        top_p=float(_number(body, "top_p", 1.0, lo=0, hi=1)),
        top_k=int(_number(body, "top_k", 0, lo=0, integer=True) if body.get("top_k") != -1 else 0),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, lo=0, lo_open=True)),
        stop=stop, seed=seed, stream=stream, include_usage=include_usage)


def _content_text(content, i: int) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and \
                    isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise bad(f"messages[{i}].content: only text parts are supported",
                          f"messages[{i}].content")
        return "".join(out)
    raise bad(f"messages[{i}].content must be a string or a list of text parts",
              f"messages[{i}].content")


def parse_chat(body: Dict[str, Any]) -> Tuple[List[Dict[str, str]], Params]:
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}",
                      f"messages[{i}].role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append({"role": role, "content": _content_text(content, i)})
    return out, parse_params(body)


def parse_completion(body: Dict[str, Any]) -> Tuple[str, Params]:
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad("'prompt' must be a string or a list of exactly one string "
                      "(one prompt per request)", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string", "prompt")
    if body.get("suffix") is not None:
        raise bad("'suffix' is not supported", "suffix")
    return prompt, parse_params(body)


def fit_max_tokens(n_prompt: int, requested: Optional[int], seq_length: int,
                   default: int = DEFAULT_MAX_TOKENS, prompt_param: str = "messages") -> int:
    """New tokens for a prompt of ``n_prompt`` tokens: ``requested``, or ``default`` capped by the
    room left; 400 ``context_length_exceeded`` when the prompt (+ ``requested``) does not fit."""
    room = seq_length - n_prompt
    if requested is None:
        if room < 1:
            raise bad(f"this model's maximum context length is {seq_length} tokens; the prompt has "
                      f"{n_prompt} tokens, which leaves no room for a completion. Shorten the "
                      "prompt.", prompt_param, "context_length_exceeded")
        return min(default, room)
    if n_prompt + requested > seq_length:
        raise bad(f"this model's maximum context length is {seq_length} tokens; you requested "
                  f"{n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} for the "
                  "completion). Reduce the prompt or max_tokens.", "max_tokens",
                  "context_length_exceeded")
    return requested


# ------------------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion}


def chat_response(rid: str, model: str, text: str, finish: str, n_prompt: int, n_completion: int,
                  created: Optional[int] = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage(n_prompt, n_completion)}


def completion_response(rid: str, model: str, text: str, finish: str, n_prompt: int,
                        n_completion: int, created: Optional[int] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": usage(n_prompt, n_completion)}


def chat_chunk(rid: str, model: str, created: int, delta: dict,
               finish: Optional[str] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish: Optional[str] = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


def usage_chunk(rid: str, model: str, created: int, obj: str, n_prompt: int,
                n_completion: int) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(n_prompt, n_completion)}


def sse(obj) -> bytes:
    """One Server-Sent Events frame: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")


def models_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(name, created)]}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "megatron_patch"}


def cut_at_stop(text: str, stops: Sequence[str]) -> Tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class StreamText:
    """The part of a row's text that is safe to send: deltas concatenate to the final text.

    While the row runs, a trailing U+FFFD (half of a multi-byte character) and any tail that could
    be the start of a stop string are held back; ``update(final_text, final=True)`` sends the rest.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.sent = ""

    def _holdback(self, text: str) -> int:
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def update(self, text: str, final: bool = False) -> str:
        if not final:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._holdback(text)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta
