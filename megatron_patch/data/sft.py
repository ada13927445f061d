"""Supervised fine-tuning data: Alpaca JSON (``instruction``, ``input``, ``output``), jsonl
``{query, response}`` and chat ``{messages: [{role, content}]}``, as a torch ``Dataset`` of dicts:

* ``tokens`` [L] int64, ``labels`` [L] int64 (already shifted: ``labels[i]`` is token ``i+1``, as in
  megatron-core's GPTDataset), ``loss_mask`` [L] float32, ``position_ids`` [L] int64,
  ``attention_mask`` None (causal masking is the model's); with packing also ``cu_seqlens`` and
  ``segment_ids`` (and a block-diagonal causal ``attention_mask`` when ``create_attention_mask``).
* Prompt tokens and padding carry label ``-100`` (``IGNORE_INDEX``) and loss_mask 0; the pad id is
  never used as the ignore marker (it may equal eod, which *is* trained on).

Sequence layout: ``[bos] + prompt + response + [eos]`` (bos only when the tokenizer has one distinct
from eod); the sequence is cut to ``seq_len + 1`` ids (so tokens/labels have at most ``seq_len``
positions) and padded to ``pad_len`` (default ``seq_len``). Alpaca and query/response prompts use
the Alpaca templates below; chat records use the tokenizer's chat template (rendered turn by turn so
only assistant turns are trained on), or the default template of ``megatron_patch.tokenizer.base``
tokenised segment by segment with ``eos`` after every assistant turn.

Packing (``packing=True``) puts several samples in one row of ``pad_len`` positions (best-fit, in
order): ``position_ids`` restart at 0 for every sample, ``cu_seqlens`` holds the sample boundaries
(the padding tail is a last segment so ``cu_seqlens[-1] == pad_len``), ``segment_ids`` is 1, 2, ...
per sample and 0 on padding. Labels never cross a sample boundary.
"""
from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from megatron_patch.data.text_io import load_records

IGNORE_INDEX = -100

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides "
                 "further context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n### Instruction:\n{instruction}"
                          "\n\n### Response:\n")


# the names --sft-format offers -> the formats detect_format names
FORMAT_ALIASES = {"query_response": "query", "messages": "chat"}


def detect_format(obj) -> Optional[str]:
    """``alpaca``, ``query``, ``chat`` or None for a record."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("messages"), list):
        return "chat"
    if isinstance(obj.get("instruction"), str) and isinstance(obj.get("output"), str):
        return "alpaca"
    if isinstance(obj.get("query"), str) and isinstance(obj.get("response"), str):
        return "query"
    return None


def _use_bos(tokenizer, add_bos: Optional[bool]) -> bool:
    if add_bos is not None:
        return add_bos and tokenizer.bos is not None
    return tokenizer.bos is not None and tokenizer.bos != tokenizer.eod


def encode_prompt_response(tokenizer, prompt: str, response: str, add_bos: Optional[bool] = None
                           ) -> Tuple[List[int], List[bool]]:
    """``[bos] + prompt + response + [eos]`` and per-id trainable flags (response + eos)."""
    ids: List[int] = [tokenizer.bos] if _use_bos(tokenizer, add_bos) else []
    ids += tokenizer.tokenize(prompt)
    n_prompt = len(ids)
    ids += tokenizer.tokenize(response) + [tokenizer.eos]
    return ids, [False] * n_prompt + [True] * (len(ids) - n_prompt)


def _text(obj, key: str, optional: bool = False) -> str:
    """obj[key] as a string; a missing/null optional field is "". Anything else (a number, a
    boolean, a list) is a malformed record, not text: ``input: 0`` is not "no input"."""
    v = obj.get(key)
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise ValueError(f"{key!r} must be a string, got {type(v).__name__}")
    return v


def alpaca_prompt(obj) -> str:
    instruction, inp = _text(obj, "instruction"), _text(obj, "input", optional=True)
    if inp.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=inp)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def encode_chat(tokenizer, messages: Sequence[dict], add_bos: Optional[bool] = None
                ) -> Tuple[List[int], List[bool]]:
    """Ids of a conversation and trainable flags (assistant turns only)."""
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError("each message needs string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn")
    if tokenizer.chat_template is None:
        # default template, segment by segment: "<|role|>\n" + content + "\n", eos after assistant
        # (the ids inference gets from apply_chat_template(..., tokenize=True))
        from megatron_patch.tokenizer.base import default_chat_ids

        ids: List[int] = [tokenizer.bos] if _use_bos(tokenizer, add_bos) else []
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        seg, seg_mask = default_chat_ids(tokenizer, messages[:last + 1])
        return ids + seg, [False] * len(ids) + seg_mask
    # the tokenizer's template: render growing prefixes and diff them
    ids, mask = [], []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = list(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True,
                                                    tokenize=True))
        full = list(tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False,
                                                  tokenize=True))
        c = _common_prefix(ids, prompt)
        del ids[c:], mask[c:]
        ids += prompt[c:]
        mask += [False] * (len(prompt) - c)
        c = _common_prefix(ids, full)
        del ids[c:], mask[c:]
        ids += full[c:]
        mask += [True] * (len(full) - c)
    return ids, mask


def encode_record(tokenizer, obj, fmt: str = "auto", add_bos: Optional[bool] = None
                  ) -> Tuple[List[int], List[bool]]:
    """(ids, trainable flags) for one SFT record; raises ValueError when it is malformed."""
    f = detect_format(obj) if fmt == "auto" else FORMAT_ALIASES.get(fmt, fmt)
    if f == "alpaca":
        return encode_prompt_response(tokenizer, alpaca_prompt(obj), _text(obj, "output"),
                                      add_bos)
    if f == "query":
        return encode_prompt_response(
            tokenizer, ALPACA_PROMPT_NO_INPUT.format(instruction=_text(obj, "query")),
            _text(obj, "response"), add_bos)
    if f == "chat":
        return encode_chat(tokenizer, obj["messages"], add_bos)
    raise ValueError("not an SFT record (need instruction/output, query/response or messages)")


def shift_and_mask(ids: Sequence[int], trainable: Sequence[bool], seq_len: int
                   ) -> Tuple[List[int], List[int]]:
    """Cut to ``seq_len + 1`` ids; tokens = ids[:-1], labels = ids[1:] with -100 where the
    predicted id is not trainable."""
    ids = list(ids[:seq_len + 1])
    trainable = list(trainable[:seq_len + 1])
    tokens = ids[:-1]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], trainable[1:])]
    return tokens, labels


def make_sample(tokens: Sequence[int], labels: Sequence[int], length: int, pad_id: int
                ) -> Dict[str, Optional[torch.Tensor]]:
    """One right-padded row of ``length`` positions."""
    n = len(tokens)
    if n > length:
        raise ValueError(f"sample of {n} tokens does not fit {length}")
    t = torch.full((length,), pad_id, dtype=torch.long)
    lab = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    t[:n] = torch.tensor(tokens, dtype=torch.long)
    lab[:n] = torch.tensor(labels, dtype=torch.long)
    return {"tokens": t, "labels": lab, "loss_mask": (lab != IGNORE_INDEX).float(),
            "attention_mask": None, "position_ids": torch.arange(length, dtype=torch.long)}


def pack(samples: Sequence[Tuple[Sequence[int], Sequence[int]]], length: int) -> List[List[int]]:
    """Best-fit packing in order: bins of sample indices whose token counts sum to <= length."""
    bins: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i, (tokens, _labels) in enumerate(samples):
        n = len(tokens)
        if n == 0:
            continue
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (cap - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (length - n, len(bins) - 1))
    return bins


def make_packed_sample(parts: Sequence[Tuple[Sequence[int], Sequence[int]]], length: int,
                       pad_id: int, create_attention_mask: bool = False) -> Dict[str, torch.Tensor]:
    tokens: List[int] = []
    labels: List[int] = []
    pos: List[int] = []
    seg: List[int] = []
    cu = [0]
    for j, (t, lab) in enumerate(parts, start=1):
        tokens += list(t)
        labels += list(lab)
        pos += list(range(len(t)))
        seg += [j] * len(t)
        cu.append(len(tokens))
    n = len(tokens)
    if n > length:
        raise ValueError("packed samples overflow the row")
    if n < length:
        pad = length - n
        tokens += [pad_id] * pad
        labels += [IGNORE_INDEX] * pad
        pos += list(range(pad))
        seg += [0] * pad
        cu.append(length)
    lab = torch.tensor(labels, dtype=torch.long)
    out = {"tokens": torch.tensor(tokens, dtype=torch.long), "labels": lab,
           "loss_mask": (lab != IGNORE_INDEX).float(), "attention_mask": None,
           "position_ids": torch.tensor(pos, dtype=torch.long),
           "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
           "segment_ids": torch.tensor(seg, dtype=torch.long)}
    if create_attention_mask:
        out["attention_mask"] = block_causal_mask(out["segment_ids"])
    return out


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[1, L, L] bool, True = masked out (megatron-core's convention): causal and within segment
    (padding positions, segment 0, attend only to themselves)."""
    L = segment_ids.shape[0]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    same = segment_ids[:, None] == segment_ids[None, :]
    allowed = causal & same
    pad = segment_ids == 0
    allowed[pad] = torch.eye(L, dtype=torch.bool)[pad]
    return (~allowed).unsqueeze(0)


def collate(batch: Sequence[dict]) -> dict:
    """Stack a list of samples; None stays None; ``cu_seqlens`` are offset and concatenated
    (flash-attention's varlen layout over the flattened batch)."""
    out = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if vals[0] is None:
            out[k] = None
        elif k == "cu_seqlens":
            offs, pieces = 0, []
            for i, v in enumerate(vals):
                pieces.append((v if i == 0 else v[1:]) + offs)
                offs += int(batch[i]["tokens"].shape[-1])
            out[k] = torch.cat(pieces)
        elif isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


class SFTDataset(Dataset):
    """SFT samples from json/jsonl files (see the module docstring).

    ``seq_len``: longest sequence kept (tokens per row before padding); ``pad_len``: row length
    (default ``seq_len``; rows are cut to ``min(seq_len, pad_len)``). Malformed records are counted
    in ``self.bad`` with file:line and skipped; all-bad input raises ``ValueError``.
    """

    def __init__(self, paths, tokenizer, seq_len: int, pad_len: Optional[int] = None,
                 packing: bool = False, fmt: str = "auto", add_bos: Optional[bool] = None,
                 create_attention_mask: bool = False) -> None:
        self.tokenizer = tokenizer
        self.length = int(pad_len or seq_len)
        self.max_tokens = min(int(seq_len), self.length)
        self.pad_id = tokenizer.pad
        self.packing = packing
        self.create_attention_mask = create_attention_mask
        records, self.bad = load_records(paths, "SFT data")
        self.samples: List[Tuple[List[int], List[int]]] = []
        self.truncated = 0
        self.full_lengths: List[int] = []
        for path, n, obj in records:
            try:
                ids, trainable = encode_record(tokenizer, obj, fmt, add_bos)
            except Exception as e:  # noqa: BLE001 -- a record the format, the chat template
                # (jinja's TemplateError) or the tokenizer (a lone surrogate) refuses is one bad
                # record, never the end of the dataset
                self.bad.add(path, n, "bad-sft-record", f"{type(e).__name__}: {e}"[:120])
                continue
            self.full_lengths.append(len(ids))
            if len(ids) > self.max_tokens + 1:
                self.truncated += 1
            self.samples.append(shift_and_mask(ids, trainable, self.max_tokens))
        if not self.samples:
            raise ValueError(f"SFT data {paths!r}: every record is malformed "
                             f"({self.bad.examples[:3]})")
        if self.bad:
            import sys

            print(f"SFT data: {self.bad.total} bad records skipped: {self.bad.examples[:5]}",
                  file=sys.stderr)
        self.bins = pack(self.samples, self.length) if packing else None

    def __len__(self) -> int:
        return len(self.bins) if self.packing else len(self.samples)

    def __getitem__(self, i: int) -> dict:
        if self.packing:
            return make_packed_sample([self.samples[j] for j in self.bins[i]], self.length,
                                      self.pad_id, self.create_attention_mask)
        tokens, labels = self.samples[i]
        s = make_sample(tokens, labels, self.length, self.pad_id)
        if self.create_attention_mask:
            s["attention_mask"] = block_causal_mask(
                torch.tensor([1] * len(tokens) + [0] * (self.length - len(tokens))))
        return s


def token_lengths(paths, tokenizer, kind: str = "sft") -> List[int]:
    """Full token length of every record (before truncation): SFT/reward/RL prompt data."""
    records, _bad = load_records(paths, f"{kind} data")
    out = []
    for _path, _n, obj in records:
        try:
            if kind == "sft":
                out.append(len(encode_record(tokenizer, obj)[0]))
            elif kind == "reward":
                from megatron_patch.data.reward import encode_reward_record

                out.extend(len(ids) for ids, _m in encode_reward_record(tokenizer, obj)[0])
            else:
                from megatron_patch.data.rl import prompt_text

                out.append(len(tokenizer.tokenize(prompt_text(obj))))
        except Exception:  # noqa: BLE001 -- bad records are the datasets' to report
            continue
    return out


def length_stats(lengths: Sequence[int], bins: int = 10) -> dict:
    """Percentiles and an equal-width histogram of token lengths."""
    import numpy as np

    a = np.asarray(lengths, dtype=np.int64)
    if a.size == 0:
        raise ValueError("no lengths")
    pct = {p: int(np.percentile(a, p, method="higher")) for p in (50, 75, 90, 95, 99, 100)}
    counts, edges = np.histogram(a, bins=bins)
    return {"count": int(a.size), "mean": float(a.mean()), "min": int(a.min()),
            "max": int(a.max()), "percentiles": pct,
            "histogram": [(int(edges[i]), int(edges[i + 1]), int(c)) for i, c in enumerate(counts)]}
