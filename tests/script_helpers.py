"""Helpers of the launch-script tests: run an ``examples/`` script under bash in a clean CPU
environment (none of the variables the scripts read leaks in from the caller's)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# variables the scripts read from the environment: the tests set what they need, nothing leaks in
SCRIPT_ENV = ["TASK", "TOKENIZER_PATH", "TOKENIZER_MODEL", "VOCAB_FILE", "GLOBAL_BATCH_SIZE",
              "PACKING", "REWARD_MARGIN", "SAVE_INTERVAL", "NPROC_PER_NODE", "EXTRA_ARGS",
              "MODEL_SIZE", "LOAD_PATH", "DATASET_PATH", "VALID_DATASET_PATH", "OUTPUT_DIR", "ENV",
              "TP", "PP", "EP", "BATCH_SIZE", "EPOCHS", "LR", "MIN_LR", "SEQ_LEN", "PAD_LEN", "PR",
              "AC", "DO", "FL", "SP", "EXTRA_VOCAB_SIZE", "MEGATRON_PATH", "MEGATRON_PATCH_PATH"]


def script(kind, family):
    return os.path.join(ROOT, "examples", family, f"run_{kind}_megatron_{family}.sh")


def clean_env(**extra):
    out = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    out.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", MEGATRON_PATCH_DEVICE="cpu")
    out["PATH"] = os.path.dirname(sys.executable) + os.pathsep + out.get("PATH", "")
    out.update({k: str(v) for k, v in extra.items()})
    return out


def run(argv, env=None, cwd=None, timeout=300):
    return subprocess.run(["bash", *argv], capture_output=True, text=True,
                          env=env or clean_env(), cwd=cwd, timeout=timeout)


def ok(r):
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def only(path):
    items = os.listdir(path)
    assert len(items) == 1, items
    return os.path.join(path, items[0])
