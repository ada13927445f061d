"""Mixture-of-experts training with expert parallelism (EP) on megatron-core, two CPU processes.

The tiny Mixtral (4 experts, top-2, dropless) starts from one legacy checkpoint written at EP=1.
EP=2 (each rank holds 2 experts) must give the EP=1 losses; its legacy checkpoint must hold every
expert-parallel rank's experts in Megatron-LM's ``mp_rank_TT_EEE`` folders (the trainer once wrote
only data-parallel rank 0's file, silently dropping half of the experts); a stop-and-resume at EP=2
with the distributed optimizer must reproduce the uninterrupted losses bit for bit (legacy and
``torch_dist``); the converter must read the EP=2 checkpoint back into one HF model with all experts;
a ``torch_dist`` resume at EP=1 of an EP=2 optimizer (two chained optimizers in megatron-core) is a
one-line error, and --no-load-optim resumes the weights.
"""
import json
import os

import pytest
import torch

from megatron_patch.launch import WorkerError, launch_local

COMMON = ["-m", "megatron_patch.training.pretrain", "--model-family", "mixtral",
          "--model-size", "tiny", "--mock-data", "--vocab-size", "256", "--seq-length", "32",
          "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3", "--seed", "7",
          "--eval-interval", "0"]


def losses(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r["lm_loss"] for r in sorted(recs, key=lambda r: r["iteration"]) if "lm_loss" in r]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("moe"))
    init = os.path.join(tmp, "init")
    launch_local(COMMON + ["--train-iters", "0", "--save", init], 1)
    runs = {}
    for name, ep, extra in (("ep1", 1, []), ("ep2", 2, ["--use-distributed-optimizer"])):
        log = os.path.join(tmp, name, "log")
        out = launch_local(COMMON + ["--train-iters", "5", "--pretrained-checkpoint", init,
                                     "--expert-model-parallel-size", str(ep), "--log-dir", log,
                                     "--save", os.path.join(tmp, name, "ckpt"), *extra], 2)
        runs[name] = (losses(log), out)
    return tmp, init, runs


def test_ep2_equals_ep1(moe):
    _, _, runs = moe
    ref, got = runs["ep1"][0], runs["ep2"][0]
    assert len(ref) == len(got) == 5
    assert ref[-1] < ref[0]
    for x, y in zip(got, ref):
        assert abs(x - y) <= 1e-5 * abs(y), (got, ref)
    banner = [line for line in runs["ep2"][1][-1].splitlines() if "mixtral model:" in line]
    assert banner and "EP=2" in banner[0], runs["ep2"][1][-1][-2000:]
    # the parameter count is the model's, whatever the expert split
    count = [line.split(" parameters")[0].split()[-1]
             for out in (runs["ep1"][1][-1], runs["ep2"][1][-1])
             for line in out.splitlines() if "mixtral model:" in line]
    assert len(count) == 2 and count[0] == count[1], count


def test_ep2_checkpoint_holds_every_expert(moe, tmp_path):
    tmp, _, _ = moe
    ckpt = os.path.join(tmp, "ep2", "ckpt")
    it = os.path.join(ckpt, "iter_0000005")
    assert sorted(os.listdir(it)) == ["mp_rank_00_000", "mp_rank_00_001"]
    meta = json.load(open(os.path.join(ckpt, "megatron_patch.json")))
    assert meta["expert_model_parallel_size"] == 2
    files = [torch.load(os.path.join(it, d, "model_optim_rng.pt"), map_location="cpu",
                        weights_only=False)["model"] for d in sorted(os.listdir(it))]
    key = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"
    assert not torch.equal(files[0][key.format(0)], files[1][key.format(0)])

    from megatron_patch.convert import engine
    from safetensors.torch import load_file

    hf = str(tmp_path / "hf")
    engine.megatron_to_hf(ckpt, hf, log=lambda *a: None)
    weights = {}
    for name in os.listdir(hf):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(hf, name)))
    cfg = json.load(open(os.path.join(hf, "config.json")))
    assert cfg["num_local_experts"] == 4
    ffn = cfg["intermediate_size"]
    for e in range(4):  # expert e lives on EP rank e // 2 as local expert e % 2
        fc1 = files[e // 2][key.format(e % 2)]  # [gate; up]
        w1 = weights[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"]
        w3 = weights[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"]
        assert torch.equal(w1, fc1[:ffn]) and torch.equal(w3, fc1[ffn:]), e


def _resumable(tmp, name, init, *flags):
    """The ep2 run's command with a checkpoint every 3 iterations that it also resumes from."""
    ck, log = os.path.join(tmp, name, "ckpt"), os.path.join(tmp, name, "log")
    argv = COMMON + ["--train-iters", "5", "--pretrained-checkpoint", init,
                     "--use-distributed-optimizer", "--log-dir", log, "--save", ck, "--load", ck,
                     "--save-interval", "3", *flags]
    return argv, ck, log


def test_ep2_resume_is_exact(moe):
    tmp, init, runs = moe
    ref = runs["ep2"][0]
    argv, ck, log = _resumable(tmp, "ep2_resume", init, "--expert-model-parallel-size", "2")
    launch_local(argv + ["--exit-interval", "3"], 2)
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "3"
    assert sorted(os.listdir(os.path.join(ck, "iter_0000003"))) == \
        ["mp_rank_00_000", "mp_rank_00_001"]
    launch_local(argv, 2)
    assert losses(log) == ref


def test_ep2_checkpoint_starts_ep2_and_ep1_runs_alike(moe):
    """Weights from the EP=2 checkpoint: at EP=2 each rank reads its own expert file, at EP=1 a
    regathered copy; both continue with the same losses."""
    tmp, _, _ = moe
    src = os.path.join(tmp, "ep2", "ckpt")
    got = {}
    for ep in (2, 1):
        log = os.path.join(tmp, f"from_ep2_at_ep{ep}", "log")
        out = launch_local(COMMON + ["--train-iters", "3", "--pretrained-checkpoint", src,
                                     "--expert-model-parallel-size", str(ep), "--seed", "11",
                                     "--log-dir", log], 2)
        assert ("resharding" in out[0]) == (ep == 1), out[0][-2000:]
        got[ep] = losses(log)
    assert len(got[1]) == 3
    for x, y in zip(got[2], got[1]):
        assert abs(x - y) <= 1e-5 * abs(y), got


def test_ep2_torch_dist_resume_is_exact_and_ep1_optimizer_is_refused(moe):
    tmp, init, runs = moe
    ref = runs["ep2"][0]
    argv, ck, log = _resumable(tmp, "ep2_dist", init, "--ckpt-format", "torch_dist")
    launch_local(argv + ["--expert-model-parallel-size", "2", "--exit-interval", "3"], 2)
    # EP=1 has one optimizer where EP=2 had two (dense, experts): refused before any step
    with pytest.raises(WorkerError) as e:
        launch_local(argv + ["--expert-model-parallel-size", "1"], 2)
    errors = {line for line in str(e.value).splitlines() if line.startswith("error:")}
    assert len(errors) == 1 and "2 chained optimizer(s) (saved at EP=2)" in errors.pop(), \
        str(e.value)[-3000:]
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "3"
    launch_local(argv + ["--expert-model-parallel-size", "2"], 2)
    assert losses(log) == ref
