"""PPO on a CUDA GPU (skipped without one): policy, reference, reward and value models in bf16,
colocated on one device. With ``--offload true`` every idle role's storages go to pinned host
memory between phases and come back; the episodes are the same to the bit as without it, and the
most bytes held at once are the policy's while it trains, byte for byte what the same run in fp32
on the CPU predicts (the CPU test in ``test_rlhf.py`` proves the bookkeeping; this one the pinned,
asynchronous copies on a device and the mixed-precision byte count)."""
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
    assert kept[-1]["resident_mb_max"] == roles
    # The same run in fp32 on the CPU. Per parameter, a trainable role holds 4 bytes of weights,
    # 4 of gradient buffer and 8 of Adam moments there (16), and in bf16 2 of weights, 4 of fp32
    # main weights, 4 of fp32 gradient buffer and 8 of moments (18); a frozen role holds its
    # weights, 4 or 2 bytes. So the four roles come to 20 bytes per parameter of the policy and
    # value models (P + V) in both, and the offloading peak, the policy while it trains, to 16 P
    # and 18 P: the GPU's is 18/16 of the CPU's, to the byte.
    cpu = rlhf(ws, "cpu_offload_yes", 1, *steps[1:], "--offload", "true",
               env={"MEGATRON_PATCH_DEVICE": "cpu"})
    print(f"GPU bf16: most MB held at once {held:.4f} offloading, {roles:.4f} not; CPU fp32: "
          f"{cpu[-1]['resident_mb_max']:.4f} and {cpu[-1]['roles_mb']:.4f}")
    assert roles == cpu[-1]["roles_mb"]
    assert held * 16 == cpu[-1]["resident_mb_max"] * 18, (held, cpu[-1]["resident_mb_max"])
    assert held < roles
