"""Reward-model data: pairs ``{prompt, chosen, rejected}`` and listwise
``{query, response: [...], score: [...]}`` as a torch ``Dataset``.

Each item holds K candidate sequences (K = 2 for pairs, chosen first, scores [1, 0]; K = the list
length for listwise records, in the record's order): ``tokens``/``labels``/``loss_mask``/
``position_ids`` of shape [K, L], ``attention_mask`` None, ``scores`` [K] float and ``lengths`` [K]
(real tokens per row; the reward is read at ``lengths - 1``). A row is
``[bos] + prompt + response + [eos]`` with the prompt used verbatim (format it beforehand, e.g.
``"Human: ...\\n\\nAssistant: "``), eos included as the last input token: the reward is read at
eos, where PPO reads it on a generated response that ended (a row cut to the sequence length is
read at its last token, as PPO reads a response that did not end). Labels are shifted and the
prompt masked (-100) as in ``sft`` (the reward loss does not use them). Malformed records are
reported with file:line and skipped; a pair whose candidates are the same tokens (``chosen ==
rejected``, or both cut to the same prefix) and a list whose scores all tie carry no preference
and are skipped and counted as well; all-bad input raises ``ValueError``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from megatron_patch.data.sft import encode_prompt_response, make_sample, shift_and_mask
from megatron_patch.data.text_io import load_records


def encode_reward_record(tokenizer, obj, add_bos: Optional[bool] = None
                         ) -> Tuple[List[Tuple[List[int], List[bool]]], List[float]]:
    """([(ids, trainable)] per candidate, scores) for one record; ValueError when malformed."""
    if not isinstance(obj, dict):
        raise ValueError("record is not an object")
    if "chosen" in obj or "rejected" in obj:
        prompt = obj.get("prompt") if isinstance(obj.get("prompt"), str) else obj.get("query")
        chosen, rejected = obj.get("chosen"), obj.get("rejected")
        if not all(isinstance(x, str) for x in (prompt, chosen, rejected)):
            raise ValueError("pair records need string prompt, chosen and rejected")
        cands, scores = [chosen, rejected], [1.0, 0.0]
    else:
        prompt = obj.get("query") if isinstance(obj.get("query"), str) else obj.get("prompt")
        cands, scores = obj.get("response"), obj.get("score")
        if not isinstance(prompt, str) or not isinstance(cands, list) or len(cands) < 2 \
                or not all(isinstance(c, str) for c in cands):
            raise ValueError("listwise records need a string query and a list of >= 2 responses")
        if not isinstance(scores, list) or len(scores) != len(cands):
            raise ValueError("listwise records need one score per response")
        scores = [float(s) for s in scores]
    return [encode_prompt_response(tokenizer, prompt, c, add_bos) for c in cands], scores


class RewardDataset(Dataset):
    """Reward pairs / lists (see the module docstring)."""

    def __init__(self, paths, tokenizer, seq_len: int, pad_len: Optional[int] = None,
                 add_bos: Optional[bool] = None) -> None:
        self.length = int(pad_len or seq_len)
        self.max_tokens = min(int(seq_len), self.length)
        self.pad_id = tokenizer.pad
        records, self.bad = load_records(paths, "reward data")
        self.items: List[Tuple[List[Tuple[List[int], List[int]]], List[float]]] = []
        for path, n, obj in records:
            try:
                cands, scores = encode_reward_record(tokenizer, obj, add_bos)
            except Exception as e:  # noqa: BLE001 -- the format or the tokenizer refuses it
                self.bad.add(path, n, "bad-reward-record", f"{type(e).__name__}: {e}"[:120])
                continue
            # ids + one more position: the rows' tokens keep eos (see the module docstring)
            rows = [shift_and_mask(list(ids) + [self.pad_id], list(m) + [False], self.max_tokens)
                    for ids, m in cands]
            if len(set(scores)) < 2:
                self.bad.add(path, n, "tied-scores", "every candidate has the same score")
                continue
            if len({tuple(t) for t, _ in rows}) < len(rows):
                self.bad.add(path, n, "identical-candidates",
                             "two candidates are the same tokens (after the cut to "
                             f"{self.max_tokens})")
                continue
            self.items.append((rows, scores))
        if not self.items:
            raise ValueError(f"reward data {paths!r}: every record is malformed "
                             f"({self.bad.examples[:3]})")
        if self.bad:
            import sys

            print(f"reward data: {self.bad.total} records skipped {dict(self.bad.counts)}: "
                  f"{self.bad.examples[:5]}", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        cands, scores = self.items[i]
        rows = [make_sample(t, lab, self.length, self.pad_id) for t, lab in cands]
        out = {k: torch.stack([r[k] for r in rows]) for k in ("tokens", "labels", "loss_mask",
                                                              "position_ids")}
        out["attention_mask"] = None
        out["scores"] = torch.tensor(scores, dtype=torch.float32)
        out["lengths"] = torch.tensor([len(t) for t, _ in cands], dtype=torch.long)
        return out
