"""Megatron's legacy checkpoint layout, shared by training and conversion.

```
<root>/latest_checkpointed_iteration.txt      "release" or an iteration number
<root>/<release|iter_0000100>/mp_rank_XX[_YYY]/model_optim_rng.pt   (_YYY only when PP > 1)
<root>/<release|iter_...>/torch_dist/ ...   (megatron-core dist_checkpointing, --ckpt-format torch_dist)
<root>/megatron_patch.json                  family, hf config, tokenizer, reward-model flag
<root>/config.json + tokenizer files        the HF config and tokenizer the checkpoint came with
```

Every write is atomic: files are written to a temporary name and renamed; an iteration folder is
complete before the tracker file (itself replaced atomically) points at it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any, Optional

import torch

TRACKER = "latest_checkpointed_iteration.txt"
META = "megatron_patch.json"


class CheckpointError(RuntimeError):
    pass


def iter_dirname(iteration: Optional[int]) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def rank_dirname(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0,
                 ep_size: int = 1) -> str:
    """Megatron-LM's ``mp_rank_TT[_PPP][_EEE]`` (pipeline rank when PP > 1, expert-parallel rank
    when EP > 1)."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def rank_file(root: str, iteration: Optional[int], tp_rank: int, pp_rank: int, pp_size: int,
              ep_rank: int = 0, ep_size: int = 1) -> str:
    return os.path.join(root, iter_dirname(iteration),
                        rank_dirname(tp_rank, pp_rank, pp_size, ep_rank, ep_size),
                        "model_optim_rng.pt")


def aside_dirname(iteration: Optional[int]) -> str:
    """Where a save of an iteration that already has a folder puts the older folder while it renames
    the new one in (deleted once the tracker is written)."""
    return f".{iter_dirname(iteration)}.old"


def restore_aside(root: str, iteration: Optional[int]) -> None:
    """A save killed between its two renames (the older folder of the iteration aside, the new one
    in) leaves the tracker on a missing folder and the complete older one at ``aside_dirname``: put
    it back. Safe when several processes call it at once."""
    final = os.path.join(root, iter_dirname(iteration))
    old = os.path.join(root, aside_dirname(iteration))
    if os.path.isdir(final) or not os.path.isdir(old):
        return
    try:
        os.replace(old, final)
    except OSError as e:
        if not os.path.isdir(final):  # not another process's restore: say what to do by hand
            raise CheckpointError(
                f"{final} is missing and its previous copy {old} (left by a killed save) could not "
                f"be renamed back ({e}); rename it by hand") from None


def read_tracker(root: str) -> Optional[Optional[int]]:
    """The iteration the tracker points at: an int, None for 'release'. Raises CheckpointError when
    the tracker is missing or corrupt (the message names the file and its content). Restores the
    iteration's folder first when a killed save left it aside (``restore_aside``)."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise CheckpointError(f"no {TRACKER} in {root}")
    with open(path) as f:
        text = f.read().strip()
    if text == "release":
        restore_aside(root, None)
        return None
    try:
        it = int(text)
    except ValueError:
        raise CheckpointError(f"corrupt {path}: expected an iteration number or 'release', "
                              f"found {text[:40]!r}") from None
    if it < 0:
        raise CheckpointError(f"corrupt {path}: negative iteration {it}")
    restore_aside(root, it)
    return it


def has_checkpoint(root: Optional[str]) -> bool:
    return bool(root) and os.path.isfile(os.path.join(root, TRACKER))


@contextlib.contextmanager
def atomic_file(path: str):
    """A binary file object whose contents appear at ``path`` only when the block ends without
    an error (a temporary file beside it, synced and renamed in); otherwise ``path`` is left as
    it was and the temporary file is removed."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_torch_save(obj: Any, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def write_tracker(root: str, iteration: Optional[int]) -> None:
    atomic_write_bytes(os.path.join(root, TRACKER),
                       ("release" if iteration is None else str(iteration)).encode())


def write_meta(root: str, meta: dict) -> None:
    atomic_write_bytes(os.path.join(root, META), json.dumps(meta, indent=2, sort_keys=True).encode())


def read_meta(root: str) -> dict:
    path = os.path.join(root, META)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def read_hf_config(root: str) -> Optional[dict]:
    path = os.path.join(root, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def safe_load(path: str) -> Any:
    """torch.load with weights_only=True: tensors, containers and plain values only."""
    if not os.path.isfile(path):
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
