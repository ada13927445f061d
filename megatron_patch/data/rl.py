"""RL (PPO) prompt data: jsonl ``{prompt}`` or ``{query}`` as a torch ``Dataset``.

Items are left-padded to ``pad_len`` (generation appends on the right): ``tokens`` [L] (pad id on
the left), ``attention_mask`` None, ``position_ids`` [L] (0 on padding, then 0, 1, ... over the
prompt), ``labels`` all -100 and ``loss_mask`` zeros (nothing of a prompt is trained on), and
``prompt_length`` (real tokens). Prompts longer than ``max_prompt_len`` keep their *last* tokens
(BOS, when they start with it, stays in front), counted in ``self.truncated`` and reported.
With ``use_chat_template`` the prompt is rendered as a user turn plus the generation prompt.
``self.prompts[i]`` is the text. Malformed records are reported with file:line and skipped.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch.utils.data import Dataset

from megatron_patch.data.sft import IGNORE_INDEX, _use_bos
from megatron_patch.data.text_io import load_records


def prompt_text(obj) -> str:
    if isinstance(obj, str) and obj.strip():
        return obj
    if isinstance(obj, dict):
        for k in ("prompt", "query"):
            if isinstance(obj.get(k), str) and obj[k]:
                return obj[k]
    raise ValueError("RL prompt records need a non-empty string 'prompt' or 'query'")


def cut_left(ids: Sequence[int], limit: int, bos_id: Optional[int]) -> List[int]:
    """The last ``limit`` tokens of ``ids``; a leading ``bos_id`` stays in front (the model
    was trained with it there), alone when ``limit`` is 1. (Generation's prompts are cut the same
    way: ``generation.cli.fit_prompt``.)"""
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    lead = ids[:1] if bos_id is not None and ids and ids[0] == bos_id else []
    room = max(int(limit) - len(lead), 0)
    return lead + (ids[len(ids) - room:] if room else [])


class PromptDataset(Dataset):
    """RL prompts (see the module docstring)."""

    def __init__(self, paths, tokenizer, max_prompt_len: int, pad_len: Optional[int] = None,
                 use_chat_template: bool = False, add_bos: Optional[bool] = None) -> None:
        self.length = int(pad_len or max_prompt_len)
        self.max_tokens = min(int(max_prompt_len), self.length)
        self.pad_id = tokenizer.pad
        records, self.bad = load_records(paths, "RL prompts")
        self.prompts: List[str] = []
        self.ids: List[List[int]] = []
        self.truncated = 0
        for path, n, obj in records:
            try:
                text = prompt_text(obj)
                if use_chat_template:
                    ids = list(tokenizer.apply_chat_template(
                        [{"role": "user", "content": text}], add_generation_prompt=True,
                        tokenize=True))
                else:
                    ids = ([tokenizer.bos] if _use_bos(tokenizer, add_bos) else []) + \
                        list(tokenizer.tokenize(text))
                if not ids:
                    raise ValueError("the prompt tokenizes to nothing")
            except Exception as e:  # noqa: BLE001 -- the format, template or tokenizer refuses it
                self.bad.add(path, n, "bad-prompt-record", f"{type(e).__name__}: {e}"[:120])
                continue
            if len(ids) > self.max_tokens:
                self.truncated += 1
                ids = cut_left(ids, self.max_tokens, getattr(tokenizer, "bos", None))
            self.prompts.append(text)
            self.ids.append(ids)
        if not self.ids:
            raise ValueError(f"RL prompts {paths!r}: every record is malformed "
                             f"({self.bad.examples[:3]})")
        if self.bad or self.truncated:
            import sys

            print(f"RL prompts: {len(self.ids)} kept, {self.bad.total} bad records skipped "
                  f"{dict(self.bad.counts)}{': ' + str(self.bad.examples[:5]) if self.bad else ''}"
                  f", {self.truncated} cut from the left to {self.max_tokens} tokens",
                  file=sys.stderr)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        n, L = len(ids), self.length
        tokens = torch.full((L,), self.pad_id, dtype=torch.long)
        tokens[L - n:] = torch.tensor(ids, dtype=torch.long)
        pos = torch.zeros(L, dtype=torch.long)
        pos[L - n:] = torch.arange(n)
        return {"tokens": tokens, "labels": torch.full((L,), IGNORE_INDEX, dtype=torch.long),
                "loss_mask": torch.zeros(L), "attention_mask": None, "position_ids": pos,
                "prompt_length": torch.tensor(n)}
