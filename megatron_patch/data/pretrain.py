"""Pretraining data: megatron-core ``GPTDataset`` over ``.bin/.idx`` prefixes, blends and splits,
and a sampler that resumes exactly from a consumed-samples count (Megatron's sampler order).
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset


def parse_blend(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """``[prefix]``, ``[p1, p2]`` (equal weights) or ``[w1, p1, w2, p2]`` -> (prefixes, weights)."""
    items = list(data_path)
    if len(items) > 1 and len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
            return items[1::2], weights
        except ValueError:
            pass
    return items, None


def check_prefixes(prefixes: Sequence[str]) -> None:
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise FileNotFoundError(f"dataset prefix {prefix!r}: missing {prefix + ext}")


def build_pretrain_datasets(data_path: Optional[Sequence[str]], split: str, seq_length: int,
                            seed: int, tokenizer, num_samples: Sequence[int],
                            cache_path: Optional[str] = None, mock: bool = False):
    """(train, valid, test) GPTDatasets sized ``num_samples``; built on every rank (cheap for the
    index caches; megatron-core writes them once per cache folder)."""
    blend = None
    if not mock:
        prefixes, weights = parse_blend(data_path)
        check_prefixes(prefixes)
        blend = (prefixes, weights)
    cfg = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=split,
        path_to_cache=cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    cls = MockGPTDataset if mock else GPTDataset
    sizes = [int(n) if n else None for n in num_samples]
    train, valid, test = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, cfg).build()
    return train, valid, test


class PretrainingSampler:
    """Micro-batches of one data-parallel rank, Megatron's order: each global step takes the next
    ``micro_batch_size x dp`` samples and this rank reads its slice. Starting from
    ``consumed_samples`` makes a resumed run read exactly what the uninterrupted one would."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> Iterator[List[int]]:
        step = self.mbs * self.dp_size
        start = self.consumed
        while start + step <= self.total:
            lo = start + self.dp_rank * self.mbs
            yield list(range(lo, lo + self.mbs))
            start += step


def collate(samples: List[dict]) -> dict:
    out = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        if vals[0] is None:
            out[key] = None
        elif torch.is_tensor(vals[0]):
            out[key] = torch.stack(vals)
        else:
            out[key] = torch.as_tensor(vals)
    return out


def data_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int, cyclic: bool = False, collate_fn=None) -> Iterator[dict]:
    """Yield collated micro-batches; ``cyclic`` restarts from the beginning (validation)."""
    collate_fn = collate_fn or collate
    while True:
        sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                     dp_rank, dp_size)
        for idx in sampler:
            yield collate_fn([dataset[i] for i in idx])
        if not cyclic:
            return
        consumed_samples = 0
