"""Golden losses (DESIGN.md §4): every family's tiny preset, 5 fixed-seed fp32 iterations, per-step
losses equal the checked-in ``tests/golden/losses.json``. What runs and how to regenerate the file:
``tests/workers/golden_losses.py``."""
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "workers", "golden_losses.py")
GOLDEN = os.path.join(HERE, "golden", "losses.json")


def test_every_family_reproduces_its_golden_losses(tmp_path):
    golden = json.load(open(GOLDEN))
    out = tmp_path / "losses.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    r = subprocess.run([sys.executable, WORKER, str(out)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(out.read_text())
    families = [k for k in golden if not k.startswith("_")]
    assert families == [k for k in got if not k.startswith("_")], (families, list(got))
    assert len(families) == 8
    for family in families:
        assert len(golden[family]) == 5
        torch.testing.assert_close(
            torch.tensor(got[family], dtype=torch.float64),
            torch.tensor(golden[family], dtype=torch.float64), rtol=1.3e-6, atol=1e-5,
            msg=lambda m, f=family: (
                f"{f}: per-step losses {got[f]} differ from the golden {golden[f]} (recorded with "
                f"{golden['_versions']}, now {got['_versions']}): {m}. If the change is meant, "
                "regenerate: see tests/workers/golden_losses.py"))
