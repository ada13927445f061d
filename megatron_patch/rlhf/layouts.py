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
"""
from __future__ import annotations

import contextlib
from typing import Dict, Hashable, Tuple

from megatron.core import parallel_state as ps

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


class Layouts:
    """The layouts of a job. The layout active when it is created (the engine initialised it) is
    registered under ``first_key``."""

    def __init__(self, first_key: Hashable):
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("initialise megatron-core's parallel state first")
        self._states = {first_key: _snapshot()}
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
                                         expert_model_parallel_size=ep)
            self._states[key] = _snapshot()
        finally:
            _install(shared)  # one memory buffer for every layout
            _install(self._states[before])

    @contextlib.contextmanager
    def use(self, key: Tuple):
        """Run the body with layout ``key`` installed in megatron-core's parallel state."""
        before = self._active
        if key != before:
            self._states[before] = _snapshot()  # e.g. the virtual pipeline rank moved on
            _install(self._states[key])
            self._active = key
        try:
            yield
        finally:
            if key != before:
                self._states[key] = _snapshot()
                _install(self._states[before])
                self._active = before
