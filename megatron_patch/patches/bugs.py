"""Fixes for megatron-core bugs that are not CPU-specific (most hit whenever TE/Apex are absent).

Each is applied on every device; each names the line of megatron-core 0.16.1 it works around.
"""
from __future__ import annotations

import functools
import importlib
import os
import types

import numpy
import torch

from megatron_patch.patches import register


@register("moe.te_general_gemm", "megatron.core.transformer.moe.moe_utils.te_general_gemm",
          "only defined when TE imports (moe_utils.py:22-39) but the router tests it for None "
          "(:1192): NameError for every MoE model without TE", stage="megatron", when="always")
def _moe_te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return "Transformer Engine defines it"
    moe_utils.te_general_gemm = None


@register("distopt.torch_adam_step",
          "DistributedOptimizer._set_main_param_and_optimizer_states/load_state_dict",
          "with torch AdamW (no TE/Apex): loading a fully_reshardable state raises KeyError 'step' "
          "(distrib_optimizer.py:936), and load_state_dict gives every parameter ONE shared step "
          "tensor that AdamW bumps once per parameter: wrong bias correction after resume (:818)",
          stage="megatron", when="always")
def _distopt_torch_adam_step():
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        # fused Adam keeps step in the param group: the bug cannot happen
        return "fused Adam of TE/Apex in use"
    cls = distrib_optimizer.DistributedOptimizer
    set_states = cls._set_main_param_and_optimizer_states
    load_sd = cls.load_state_dict

    @functools.wraps(set_states)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = dict(tensors, step=step)
        return set_states(self, model_param, tensors)

    @functools.wraps(load_sd)
    def load_state_dict(self, state_dict):
        out = load_sd(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return out

    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    cls.load_state_dict = load_state_dict


class _AtomicSaveNumpy(types.ModuleType):
    """A stand-in for ``numpy`` inside one megatron-core dataset module: ``save`` to a path writes
    a temporary file beside it and renames it into place; everything else is numpy itself."""

    def __init__(self):
        super().__init__("numpy")

    @staticmethod
    def save(file, arr, allow_pickle=True, **kwargs):
        if not isinstance(file, (str, os.PathLike)):
            return numpy.save(file, arr, allow_pickle=allow_pickle, **kwargs)
        from megatron_patch.convert.layout import atomic_file

        path = os.fspath(file)
        if not path.endswith(".npy"):
            path += ".npy"  # numpy.save's own rule for a path
        with atomic_file(path) as f:  # the cache file is complete or absent, never partial
            numpy.save(f, arr, allow_pickle=allow_pickle, **kwargs)

    def __getattr__(self, name):
        return getattr(numpy, name)


_INDEX_CACHE_MODULES = ("megatron.core.datasets.gpt_dataset",
                        "megatron.core.datasets.blended_dataset",
                        "megatron.core.datasets.masked_dataset")


@register("datasets.atomic_index_cache",
          ", ".join(m.rsplit(".", 1)[-1] + ".numpy.save" for m in _INDEX_CACHE_MODULES),
          "the dataset index caches (.npy) are written in place (gpt_dataset.py:549-551): a job "
          "killed while writing one, or a second job building the same cache at the same time, "
          "leaves a truncated file that later runs load (EOFError) instead of rebuilding it",
          stage="megatron", when="always")
def _atomic_index_cache():
    proxy = _AtomicSaveNumpy()
    for name in _INDEX_CACHE_MODULES:
        mod = importlib.import_module(name)
        if getattr(mod, "numpy", None) is not numpy:
            raise AttributeError(f"{name} has no module global 'numpy'")
        mod.numpy = proxy
