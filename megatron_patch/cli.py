"""What every training entry point does around its body: bad input ends as one ``error:`` line
(printed once, by rank 0) and exit code 2; the process group is torn down whatever happens.
``MEGATRON_PATCH_DEBUG=1`` re-raises instead, for the traceback."""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import torch.distributed as dist

from megatron_patch.convert.layout import CheckpointError
from megatron_patch.training.arguments import ArgumentError

INPUT_ERRORS = (ArgumentError, CheckpointError, FileNotFoundError, KeyError, ValueError)


def error_text(e: BaseException) -> str:
    """The message of ``e``: a KeyError's ``str`` is the repr of its argument (quoted), so its
    argument itself; every other message as written (its own quotes kept)."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


def run_entry(body: Callable[[], Optional[int]], cleanup: Optional[Callable[[], None]] = None
              ) -> int:
    try:
        return body() or 0
    except INPUT_ERRORS as e:
        if os.environ.get("MEGATRON_PATCH_DEBUG"):
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {error_text(e)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if cleanup is not None:
            cleanup()
