"""Bad input to training fails with one clear line and loses nothing; saves are atomic."""
import json
import os
import subprocess
import sys

import pytest

from megatron_patch.launch import WorkerError, launch_local

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "examples", "llama", "run_pretrain_megatron_llama.sh")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "r.json"
    launch_local([os.path.join(HERE, "workers", "train_atomic_save.py"), str(out),
                  str(tmp_path / "ck")], 1)
    r = json.loads(out.read_text())
    assert r["died"] and r["tracker"] == "1" and not r["iter2_exists"]
    assert r["loaded_iteration"] == 1 and r["consumed"] == 2 and r["weights_restored"]
    assert r["tracker_after_retry"] == "2" and r["partial_left"] == []
    assert "corrupt" in r["corrupt_error"] and "garbage" in r["corrupt_error"]


@pytest.mark.parametrize("argv", [["-h"], ["dsw", "-", "-"]])
def test_script_usage(argv):
    p = subprocess.run(["bash", SCRIPT, *argv], capture_output=True, text=True)
    assert p.returncode == 2
    assert "usage:" in (p.stdout + p.stderr)
    if argv != ["-h"]:
        assert "expected 23 arguments, got 3" in p.stderr


def _cli_error(args, nproc=1):
    with pytest.raises(WorkerError) as e:
        launch_local(["-m", "megatron_patch.training.pretrain", *args], nproc)
    lines = [l for l in str(e.value).splitlines() if l.startswith("error:")]
    assert len(lines) == 1, str(e.value)
    assert "Traceback" not in str(e.value)
    return lines[0]


BASE = ["--vocab-size", "256", "--seq-length", "32", "--train-iters", "2"]


def test_missing_dataset_prefix(tmp_path):
    msg = _cli_error(BASE + ["--data-path", str(tmp_path / "nope_text_document")])
    assert "nope_text_document" in msg and ".bin" in msg


def test_tp_must_divide_heads():
    msg = _cli_error(BASE + ["--mock-data", "--tensor-model-parallel-size", "2",
                             "--num-attention-heads", "3", "--hidden-size", "48",
                             "--num-query-groups", "3"], nproc=2)
    assert "does not divide the 3 attention heads" in msg


def test_corrupt_tracker(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "latest_checkpointed_iteration.txt").write_text("12x\n")
    msg = _cli_error(BASE + ["--mock-data", "--load", str(ck)])
    assert "corrupt" in msg and "latest_checkpointed_iteration.txt" in msg
