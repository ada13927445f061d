"""Megatron legacy checkpoint IO for conversion: find and memory-map every rank file of one iteration,
and address tensors by *global* names (global layer and expert indices), whatever TP/PP/EP/VPP the
checkpoint was written with.

Rank folders follow Megatron-LM: ``mp_rank_TT`` (PP = 1), ``mp_rank_TT_PPP`` (PP > 1), with
``_EEE`` appended for expert parallelism (so ``mp_rank_TT_EEE`` when PP = 1 and EP > 1; the
checkpoint's ``megatron_patch.json`` says which). Files are loaded with ``mmap=True`` and
``weights_only=True``: nothing is read until a tensor is used. Checkpoints written by training also
hold optimizer, scheduler and RNG state; only the model entries (``model`` or ``model0..``
for virtual pipeline stages) are used.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from megatron_patch.convert import layout
from megatron_patch.convert.rules import ConversionError

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")
TRAINING_ONLY_KEYS = ("optimizer", "opt_param_scheduler", "rng_state", "args", "num_floating_point_operations_so_far")


def rank_path(root: str, iteration: Optional[int], tp_rank: int, pp_rank: int, pp_size: int,
              ep_rank: int = 0, ep_size: int = 1) -> str:
    """``layout.rank_file``: Megatron-LM's ``_EEE`` suffix for expert-parallel ranks included."""
    return layout.rank_file(root, iteration, tp_rank, pp_rank, pp_size, ep_rank, ep_size)


def save_rank(path: str, state_dict: Dict[str, torch.Tensor], iteration: int = 0) -> None:
    """Write one rank file straight to disk (no in-memory copy of the serialised bytes); the caller
    writes into a temporary target directory that is renamed when everything is written."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"model": state_dict, "iteration": iteration, "checkpoint_version": 3.0}, tmp)
    os.replace(tmp, path)


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as first:
        # training checkpoints may carry argparse.Namespace args and numpy RNG states
        import numpy as np

        allowed = [argparse.Namespace, np.ndarray, np.dtype, np.dtypes.UInt32DType,
                   np.dtypes.Float64DType, np.dtypes.Int64DType]
        try:
            allowed.append(np._core.multiarray._reconstruct)
        except AttributeError:  # numpy < 2
            allowed.append(np.core.multiarray._reconstruct)
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            raise ConversionError(f"cannot read {path} (truncated or corrupt?): {first}") from first


class MegatronReader:
    """All rank files of one iteration of a legacy checkpoint, addressed by global tensor names."""

    def __init__(self, root: str, num_layers: int, num_experts: int = 0,
                 iteration: Optional[str] = None):
        self.root = root
        self.meta = layout.read_meta(root)
        if iteration is None:
            try:
                self.iteration = layout.read_tracker(root)
            except layout.CheckpointError as e:
                raise ConversionError(str(e)) from e
        else:
            self.iteration = None if iteration == "release" else int(iteration)
        it_dir = os.path.join(root, layout.iter_dirname(self.iteration))
        if not os.path.isdir(it_dir):
            raise ConversionError(f"the tracker of {root} points at {it_dir}, which does not exist")
        ep_size = int(self.meta.get("expert_model_parallel_size", 1))
        ranks: List[Tuple[int, int, int, str]] = []
        for name in sorted(os.listdir(it_dir)):
            m = _RANK_DIR.match(name)
            if not m:
                continue
            a, b, c = (int(g) if g is not None else None for g in m.groups())
            if c is not None:
                tp_r, pp_r, ep_r = a, b, c
            elif b is not None and ep_size > 1 and not self.meta.get("pipeline_model_parallel_size", 1) > 1:
                tp_r, pp_r, ep_r = a, 0, b
            else:
                tp_r, pp_r, ep_r = a, b or 0, 0
            ranks.append((tp_r, pp_r, ep_r, os.path.join(it_dir, name, "model_optim_rng.pt")))
        if not ranks:
            if os.path.isfile(os.path.join(it_dir, ".metadata")) or \
                    os.path.isfile(os.path.join(it_dir, "metadata.json")):
                raise ConversionError(f"{it_dir} is a torch_dist checkpoint; convert it with "
                                      "megatron_patch.convert.dist.torch_dist_to_legacy first")
            raise ConversionError(f"no mp_rank_* folders in {it_dir}")
        self.tp = max(r[0] for r in ranks) + 1
        self.pp = max(r[1] for r in ranks) + 1
        self.ep = max(r[2] for r in ranks) + 1
        latest = None
        try:
            latest = layout.read_tracker(root)
        except layout.CheckpointError:
            pass
        if self.iteration == latest:
            # the metadata describes the latest save: a missing last rank folder (mp_rank_03 of
            # TP 4) would otherwise read as a smaller layout and convert into wrong shapes
            for key, found in (("tensor_model_parallel_size", self.tp),
                               ("pipeline_model_parallel_size", self.pp),
                               ("expert_model_parallel_size", self.ep)):
                want = self.meta.get(key)
                if isinstance(want, int) and want != found:
                    raise ConversionError(
                        f"{it_dir}: {layout.META} says {key} {want}, but the rank folders "
                        f"make {found}: rank folders are missing or extra")
        expected = self.tp * self.pp * self.ep
        if len(ranks) != expected:
            raise ConversionError(f"{it_dir}: found {len(ranks)} rank folders, expected "
                                  f"TP {self.tp} x PP {self.pp} x EP {self.ep} = {expected}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.dropped: List[str] = []
        # global name -> {(tp, ep): tensor}
        self._index: Dict[str, Dict[Tuple[int, int], torch.Tensor]] = {}
        for tp_r, pp_r, ep_r, path in ranks:
            if not os.path.isfile(path):
                raise ConversionError(f"missing checkpoint file {path}")
            obj = _load(path)
            for k in TRAINING_ONLY_KEYS:
                if k in obj and k not in self.dropped:
                    self.dropped.append(k)
            chunks = [obj["model"]] if "model" in obj else \
                [obj[k] for k in sorted((k for k in obj if re.fullmatch(r"model\d+", k)),
                                        key=lambda s: int(s[5:]))]
            if not chunks:
                raise ConversionError(f"{path} holds no 'model' state dict")
            vpp = len(chunks)
            per_chunk = num_layers // (self.pp * vpp)
            for c, sd in enumerate(chunks):
                offset = (c * self.pp + pp_r) * per_chunk
                for key, t in sd.items():
                    if key.endswith("_extra_state") or not isinstance(t, torch.Tensor):
                        continue
                    self._index.setdefault(self._globalize(key, offset, ep_r), {})[(tp_r, ep_r)] = t
            self.vpp = vpp

    def _globalize(self, key: str, layer_offset: int, ep_rank: int) -> str:
        m = _LAYER.match(key)
        if m:
            key = f"decoder.layers.{int(m.group(1)) + layer_offset}." + key[m.end():]
        m = _EXPERT.search(key)
        if m and self.num_experts:
            local = self.num_experts // self.ep
            key = key[:m.start()] + f".local_experts.{int(m.group(1)) + ep_rank * local}." + key[m.end():]
        return key

    def names(self) -> List[str]:
        return list(self._index)

    def shards(self, name: str) -> List[torch.Tensor]:
        """The TP shards of one global tensor (from the EP rank that holds it)."""
        by_rank = self._index.get(name)
        if by_rank is None:
            raise ConversionError(f"{self.root}: the checkpoint lacks tensor {name}")
        ep_r = min(e for _, e in by_rank)
        try:
            return [by_rank[(t, ep_r)] for t in range(self.tp)]
        except KeyError:
            raise ConversionError(f"{self.root}: tensor {name} is missing on some TP rank") from None
