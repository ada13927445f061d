"""PPO on a CUDA GPU (skipped without one): policy, reference, reward and value models in bf16,
colocated on one device. With ``--offload true`` every idle role's storages go to pinned host
memory between phases and come back; the episodes are the same to the bit as without it, and the
most bytes held on the device at once fall well below the sum of the roles (the CPU test in
``test_rlhf.py`` proves the bookkeeping; this one the pinned, asynchronous copies on a device)."""
import pytest

from test_rlhf import _reward_model, rlhf, ws  # noqa: F401  (ws: the module's fixture)

pytestmark = pytest.mark.gpu

SKIP = ("time_generation_s", "time_logprobs_s", "time_training_s", "tokens_per_s",
        "resident_mb_max")


def _same(a, b):
    return [{k: v for k, v in e.items() if k not in SKIP} for e in a] == \
        [{k: v for k, v in e.items() if k not in SKIP} for e in b]


def test_offloading_on_gpu_changes_nothing_but_memory(ws):  # noqa: F811
    steps = ["--bf16", "--num-episodes", "2", "--sample-per-episode", "16",
             "--generation-batch-size", "8", "--train-micro-batch-size", "4",
             "--train-global-batch-size", "8", "--num-training-epoch", "2",
             "--reward", _reward_model(ws)]
    kept = rlhf(ws, "gpu_offload_no", 1, *steps, "--offload", "false")
    moved = rlhf(ws, "gpu_offload_yes", 1, *steps, "--offload", "true")
    assert len(kept) == len(moved) == 2
    if not _same(kept, moved):
        # tell a device that does not repeat itself from offloading that changes the numbers
        again = rlhf(ws, "gpu_offload_no_again", 1, *steps, "--offload", "false")
        cause = "offloading changed them" if _same(kept, again) else \
            "the device does not reproduce a run without offloading"
        pytest.fail(f"episodes differ ({cause}):\n{kept}\n{moved}")
    held, roles = moved[-1]["resident_mb_max"], moved[-1]["roles_mb"]
    print(f"GPU: most MB held at once {held:.2f} offloading, "
          f"{kept[-1]['resident_mb_max']:.2f} not, of {roles:.2f} for the four roles")
    assert kept[-1]["resident_mb_max"] == roles
    assert 0 < held < 0.5 * roles, (held, roles)
