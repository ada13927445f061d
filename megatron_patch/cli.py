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


def run_entry(body: Callable[[], Optional[int]], cleanup: Optional[Callable[[], None]] = None
              ) -> int:
    try:
        return body() or 0
    except INPUT_ERRORS as e:
        if os.environ.get("MEGATRON_PATCH_DEBUG"):
            raise
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {str(e).strip(chr(39) + chr(34))}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if cleanup is not None:
            cleanup()
