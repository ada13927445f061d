"""Start N local processes the way torchrun does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).

Used by tests and by tools that run a Megatron checkpoint at TP/PP > 1 on one machine (e.g. the
HF-vs-Megatron comparison). The rendezvous port is bound to a free port, never guessed. If any rank
fails, the others are killed and the failing rank's output is raised.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from megatron_patch.platform import free_port


class WorkerError(RuntimeError):
    pass


def launch_local(argv: Sequence[str], nproc: int, env: Optional[Dict[str, str]] = None,
                 timeout: float = 900, cwd: Optional[str] = None) -> List[str]:
    """Run ``python argv...`` as ``nproc`` ranks; return each rank's combined stdout+stderr."""
    port = free_port()
    base = dict(os.environ)
    base.setdefault("OMP_NUM_THREADS", "1")
    base.setdefault("TORCHDYNAMO_DISABLE", "1")
    base.update(env or {})
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), PYTHONUNBUFFERED="1")
    procs, logs = [], []
    for rank in range(nproc):
        log = tempfile.TemporaryFile(mode="w+")
        e = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=cwd))
        logs.append(log)
    deadline = time.time() + timeout
    failed = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                grace = time.time() + 5  # let the other ranks report their own error lines
                while time.time() < grace and any(p.poll() is None for p in procs):
                    time.sleep(0.05)
                break
            if all(c == 0 for c in codes):
                break
            if time.time() > deadline:
                failed = -1
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = []
    for log in logs:
        log.seek(0)
        outs.append(log.read())
        log.close()
    if failed is not None:
        if failed == -1:
            raise WorkerError(f"timeout after {timeout}s; rank 0 output:\n{outs[0][-6000:]}")
        failed_ranks = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
        text = "\n".join(f"--- rank {i} (exit {procs[i].returncode}):\n{outs[i][-8000:]}"
                         for i in failed_ranks)
        raise WorkerError(f"rank {failed} exited with {procs[failed].returncode}:\n{text}")
    return outs
