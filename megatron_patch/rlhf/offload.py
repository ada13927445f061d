"""Offloading idle RLHF roles to host memory and back, in place.

Colocated roles take turns: while the policy generates, the reference, reward and value models and
the policy's optimizer state and gradients are idle. ``RoleMemory`` moves a role's storages (the
parameters, megatron-core's DDP gradient buffers, the optimizer's fp32 main parameters and its
state) to host memory and releases the device memory by resizing each storage to 0 bytes; bringing
them back resizes and copies, so every view into them (DDP's ``main_grad`` views of the gradient
buffer, parameters that are views of a DDP parameter buffer, the optimizer's references) stays
valid without being rebuilt. Gradient buffers are not copied: they are zeroed before every
training step, so they come back as zeros.

On a GPU the host copies are pinned; on a CPU the same mechanics run (the storages are released
and restored; nothing is saved, it only proves the bookkeeping), so the trainer's results with and
without offloading can be compared anywhere.
"""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch


def _storages(tensors: Iterable[torch.Tensor]) -> List[torch.UntypedStorage]:
    """The distinct, non-empty storages behind ``tensors`` (views share one)."""
    seen: Dict[int, torch.UntypedStorage] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        s = t.untyped_storage()
        if s.nbytes() > 0:
            seen.setdefault(s.data_ptr(), s)
    return list(seen.values())


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class RoleMemory:
    """The storages of one role, in two parts: ``weights`` (parameters) and ``training``
    (gradient buffers, optimizer main parameters and state)."""

    def __init__(self, model: List[torch.nn.Module], optimizer=None):
        self.model, self.optimizer = model, optimizer
        # part -> [(storage, bytes, host copy or None)]: the storage objects themselves are kept
        # (a tensor's untyped_storage() is a new wrapper of the same memory on every call)
        self.released: Dict[str, list] = {"weights": [], "grads": [], "optimizer": []}

    # -- what belongs to the role

    def _weights(self) -> List[torch.UntypedStorage]:
        return _storages(p for m in self.model for p in m.parameters())

    def _grads(self) -> List[torch.UntypedStorage]:
        out = []
        for m in self.model:  # megatron-core DDP's buffers (a frozen role has no DDP wrapper)
            for name in ("buffers", "expert_parallel_buffers"):
                bufs = getattr(m, name, None)
                for b in bufs if isinstance(bufs, list) else []:
                    if getattr(b, "grad_data", None) is not None:
                        out.append(b.grad_data)
        return _storages(out)

    def _optimizer_state(self) -> List[torch.UntypedStorage]:
        if self.optimizer is None:
            return []
        weights = {s.data_ptr() for s in self._weights()}
        tensors = []
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is None:
                continue
            for group in inner.param_groups:
                tensors += list(group["params"])  # fp32 main copies (or the parameters)
            for st in inner.state.values():
                tensors += [v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return [s for s in _storages(tensors) if s.data_ptr() not in weights]

    def nbytes(self) -> int:
        """Device bytes this role holds now."""
        return sum(s.nbytes() for s in self._weights() + self._grads() + self._optimizer_state())

    def total_bytes(self) -> int:
        """Bytes of the role, held now or released to the host."""
        return self.nbytes() + sum(n for part in self.released.values() for _, n, _ in part)

    # -- moving

    def _release(self, part: str, storages, keep: bool) -> None:
        if self.released[part]:
            return  # already on the host
        out = []
        for st in storages:
            host = None
            if keep:
                host = torch.empty(st.nbytes(), dtype=torch.uint8, device="cpu",
                                   pin_memory=st.device.type == "cuda")
                host.copy_(_as_bytes(st), non_blocking=True)
            out.append((st, st.nbytes(), host))
        if any(st.device.type == "cuda" for st in storages):
            torch.cuda.synchronize()  # the copies are done before the memory is given back
        for st, _, _ in out:
            st.resize_(0)
        self.released[part] = out

    def _restore(self, part: str) -> None:
        for st, n, host in self.released[part]:
            st.resize_(n)
            if host is None:
                _as_bytes(st).zero_()
            else:
                _as_bytes(st).copy_(host, non_blocking=True)
        self.released[part] = []

    def offload(self, weights: bool = True, training: bool = True) -> None:
        """With ``training`` the training state (gradient buffers: dropped, they are zeroed before
        every step; optimizer: kept) and with ``weights`` the parameters, to host memory."""
        if training:
            self._release("grads", self._grads(), keep=False)
            self._release("optimizer", self._optimizer_state(), keep=True)
        if weights:
            self._release("weights", self._weights(), keep=True)

    def onload(self, training: bool = False) -> None:
        """The parameters back on the device and, with ``training``, the gradient buffers (zeros)
        and the optimizer state."""
        self._restore("weights")
        if training:
            self._restore("grads")
            self._restore("optimizer")
