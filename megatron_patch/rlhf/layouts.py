"""Several tensor/pipeline-parallel layouts of one torchrun world, one per RLHF role.

megatron-core keeps *the* parallel layout in module-level state of ``megatron.core.parallel_state``
(the process groups, their global ranks, the cached sizes and ranks): one layout per process. RLHF
roles may each want their own (a policy trained at TP=2 next to a reward model at TP=1, in the same
processes). ``Layouts`` builds every layout once with megatron-core's own
``initialize_model_parallel`` (all ranks, same order: the groups are created collectively), keeps
each one's module state, and ``use(key)`` installs a layout's state for the calls of one role:
building its model, loading its weights, its forward/backward passes, its optimizer steps, its
generation. Modules keep the groups they were built with; what megatron-core looks up at call time
(schedules, gradient finalisation, the default TP group of its linears) then sees the same layout.

Every role spans the whole world: a layout of TP x PP has world / (TP x PP) data-parallel replicas.

megatron-core's RNG tracker (the streams its dropout forks: the model-parallel one is seeded with the
TP rank) is module state too: given the job's seed, each layout gets its own tracker, seeded as
``model_parallel_cuda_manual_seed`` seeds it for that layout's ranks, and ``use`` installs it with
the groups (otherwise a role on a second layout forks the first layout's streams: the two TP ranks
of a TP=2 value model beside a TP=1 policy would share their attention-dropout masks).
"""
from __future__ import annotations

import contextlib
from typing import Dict, Hashable, Optional, Tuple

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mr

from megatron_patch import platform

# buffers shared by every layout (not part of a layout's groups)
_SHARED = {"_GLOBAL_MEMORY_BUFFER", "_GLOBAL_SYMMETRIC_MEMORY_BUFFER"}


def _state_names():
    return [n for n in vars(ps) if n.startswith("_") and n[1:2].isupper() and n.upper() == n
            and n not in _SHARED]


def _snapshot() -> Dict[str, object]:
    return {n: getattr(ps, n) for n in _state_names()}


def _install(state: Dict[str, object]) -> None:
    for n, v in state.items():
        setattr(ps, n, v)


def _seeded_tracker(seed: int):
    """A new RNG tracker seeded for the installed layout's ranks (megatron-core's
    ``model_parallel_cuda_manual_seed``); the installed tracker and the generators are left as
    they were."""
    before = mr._CUDA_RNG_STATE_TRACKER, mr._CUDA_RNG_STATE_TRACKER_INITIALIZED
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    try:  # Megatron-LM's rule, as engine.seed_all: the seed moves with the pipeline rank
        mr.model_parallel_cuda_manual_seed(seed + 100 * ps.get_pipeline_model_parallel_rank(),
                                           force_reset_rng=True)
        return mr._CUDA_RNG_STATE_TRACKER
    finally:
        mr._CUDA_RNG_STATE_TRACKER, mr._CUDA_RNG_STATE_TRACKER_INITIALIZED = before
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


class Layouts:
    """The layouts of a job. The layout active when it is created (the engine initialised it and
    seeded megatron-core's RNG tracker with ``seed``) is registered under ``first_key``; with a
    ``seed``, every added layout gets an RNG tracker of its own. ``timeout_minutes``: that of the
    added layouts' process groups (``--distributed-timeout-minutes``)."""

    def __init__(self, first_key: Hashable, seed: Optional[int] = None,
                 timeout_minutes: int = platform.DEFAULT_TIMEOUT_MINUTES):
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("initialise megatron-core's parallel state first")
        self._states = {first_key: _snapshot()}
        self._seed = seed
        self._timeout_minutes = timeout_minutes
        self._trackers = {first_key: mr._CUDA_RNG_STATE_TRACKER}
        self._active = first_key

    @staticmethod
    def key(tp: int, pp: int, vpp=None, ep: int = 1) -> Tuple:
        return (int(tp), int(pp), vpp, int(ep or 1))

    def __contains__(self, key) -> bool:
        return key in self._states

    def add(self, key: Tuple) -> None:
        """Create the process groups of layout ``key`` = (TP, PP, virtual PP, EP). Collective:
        every rank calls it, in the same order."""
        if key in self._states:
            return
        tp, pp, vpp, ep = key
        before = self._active
        shared = {n: getattr(ps, n, None) for n in _SHARED}
        _install({n: None for n in list(_state_names()) + list(_SHARED)})  # afresh: the other
        try:  # layouts' groups stay alive in their snapshots
            ps.initialize_model_parallel(tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp,
                                         virtual_pipeline_model_parallel_size=vpp,
                                         expert_model_parallel_size=ep,
                                         distributed_timeout_minutes=self._timeout_minutes)
            self._states[key] = _snapshot()
            # without a seed: the layouts share the installed tracker (as before)
            self._trackers[key] = (mr._CUDA_RNG_STATE_TRACKER if self._seed is None else
                                   _seeded_tracker(self._seed))
        finally:
            _install(shared)  # one memory buffer for every layout
            _install(self._states[before])

    @contextlib.contextmanager
    def use(self, key: Tuple):
        """Run the body with layout ``key`` installed in megatron-core's parallel state."""
        before = self._active
        if key != before:
            self._states[before] = _snapshot()  # e.g. the virtual pipeline rank moved on
            self._trackers[before] = mr._CUDA_RNG_STATE_TRACKER
            _install(self._states[key])
            mr._CUDA_RNG_STATE_TRACKER = self._trackers[key]
            self._active = key
        try:
            yield
        finally:
            if key != before:
                self._states[key] = _snapshot()
                self._trackers[key] = mr._CUDA_RNG_STATE_TRACKER
                _install(self._states[before])
                mr._CUDA_RNG_STATE_TRACKER = self._trackers[before]
                self._active = before
