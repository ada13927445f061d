"""Device and backend selection: CUDA + NCCL when a GPU is usable, otherwise CPU + gloo.

Everything in the project asks this module, never ``torch.cuda.is_available()`` directly, so that
``MEGATRON_PATCH_DEVICE=cpu`` can force the CPU path on a GPU machine (useful for debugging and for
exact CPU reference runs). The decision is taken once, before megatron-core is imported.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch

DEFAULT_TIMEOUT_MINUTES = 30  # torch.distributed / megatron-core process groups
_FORCED = os.environ.get("MEGATRON_PATCH_DEVICE", "").strip().lower()
if _FORCED not in ("", "cpu", "cuda", "auto"):
    raise ValueError(f"MEGATRON_PATCH_DEVICE must be cpu, cuda or auto, got {_FORCED!r}")
if _FORCED == "cpu" and not torch.cuda.is_initialized():
    # Hide the GPUs before anything initialises CUDA, so megatron-core takes its CPU branches.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def use_cuda() -> bool:
    """True when this process trains on a GPU."""
    if _FORCED == "cpu":
        return False
    return torch.cuda.is_available()


def device_type() -> str:
    return "cuda" if use_cuda() else "cpu"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def current_device() -> torch.device:
    """The device tensors of this rank live on."""
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if use_cuda() else "gloo"


def free_port() -> int:
    """A TCP port that is free right now (bind to port 0; never guess a random one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> None:
    """Initialise torch.distributed from the torchrun environment (or as a world of one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    own_port = "MASTER_PORT" not in os.environ
    if own_port and int(os.environ["WORLD_SIZE"]) > 1:
        raise RuntimeError("WORLD_SIZE > 1 needs MASTER_PORT (use torchrun)")
    if use_cuda():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = None
    if own_port:  # a world of one: its store binds port 0 itself (no window for another socket
        # to take a port chosen beforehand, as free_port() leaves one)
        store = dist.TCPStore(os.environ["MASTER_ADDR"], 0, 1, is_master=True, timeout=timeout)
        os.environ["MASTER_PORT"] = str(store.port)
    dist.init_process_group(backend=backend(), store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
