"""Golden losses: one fixed-seed tiny run of every family, its per-step losses checked in.

Each family's ``tiny`` preset trains 5 fp32 iterations with ``megatron_patch.training.pretrain`` on
megatron-core's mock data (vocabulary 256, 32 tokens, global batch 4, Adam at 1e-3 with warm-up and
cosine decay, seed 1234), one process, one after the other. ``tests/test_golden_losses.py`` runs this
and compares every loss with ``tests/golden/losses.json`` (``torch.testing.assert_close``'s fp32
tolerance). A change that moves them is a change of the training numerics: find out why first.
Regenerate only when that is intended (a new megatron-core or torch, a fixed defect), and say so in
the commit:

    OMP_NUM_THREADS=1 TORCHDYNAMO_DISABLE=1 python tests/workers/golden_losses.py --write

Without ``--write``: ``python tests/workers/golden_losses.py OUT.json`` writes the losses to OUT.json.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(os.path.dirname(HERE), "golden", "losses.json")
FAMILIES = ["llama", "qwen2", "mistral", "mixtral", "glm", "galactica", "bloom", "falcon"]
ITERS = 5
ARGV = ["--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1",
        "--seed", "1234", "--train-iters", str(ITERS), "--eval-interval", "0",
        "--model-size", "tiny", "--log-interval", "1"]


def run_family(family: str, log_dir: str) -> list:
    from megatron.core import parallel_state

    from megatron_patch.training import pretrain

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    os.environ.pop("MASTER_PORT", None)  # a fresh free port for each world of one
    rc = pretrain.main(ARGV + ["--model-family", family, "--log-dir", log_dir])
    if rc:
        raise SystemExit(f"{family}: pretrain exited {rc}")
    losses = {}
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "lm_loss" in rec:
                losses[rec["iteration"]] = rec["lm_loss"]
    if sorted(losses) != list(range(1, ITERS + 1)):
        raise SystemExit(f"{family}: logged iterations {sorted(losses)}")
    return [losses[i] for i in range(1, ITERS + 1)]


def main(argv) -> int:
    import megatron_patch  # noqa: F401  (patches megatron-core first)
    import torch

    write = "--write" in argv
    out = GOLDEN if write else argv[0]
    res = {"_about": "per-step lm loss of tests/workers/golden_losses.py; regenerate with "
                     "`python tests/workers/golden_losses.py --write` (see its docstring)",
           "_versions": {"torch": torch.__version__.split("+")[0],
                         "megatron-core": megatron_patch.patches.megatron_core_version()}}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            res[family] = run_family(family, os.path.join(tmp, family))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
