"""The contract with the training engine: a converted checkpoint is loaded by pretraining
(``--pretrained-checkpoint``) at TP=2; with a zero learning rate the weights stay put, so the
checkpoints training writes (legacy ``iter_*`` with optimizer state, and ``torch_dist``) convert back
to HF bit-identically.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workers.convert_cases import _llama, build_hf  # noqa: E402
from tests.workers.convert_parity import compare_dirs  # noqa: E402


def _train(pretrained, save, fmt):
    from megatron_patch.launch import launch_local

    launch_local(["-m", "megatron_patch.training.pretrain", "--model-size", "auto",
                  "--pretrained-checkpoint", pretrained, "--tensor-model-parallel-size", "2",
                  "--mock-data", "--train-iters", "2", "--save", save, "--save-interval", "2",
                  "--ckpt-format", fmt, "--micro-batch-size", "1", "--global-batch-size", "2",
                  "--seq-length", "16", "--lr", "0", "--min-lr", "0", "--vocab-size", "200"],
                 2, cwd=ROOT, timeout=600)


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_trained_checkpoint_converts_back(tmp_path, fmt):
    from megatron_patch.convert import engine

    build_hf(_llama(), str(tmp_path / "hf"))
    engine.hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mg"), tp=2, log=lambda *a: None)
    _train(str(tmp_path / "mg"), str(tmp_path / "train"), fmt)
    assert (tmp_path / "train" / "iter_0000002").is_dir()
    notes = []
    engine.megatron_to_hf(str(tmp_path / "train"), str(tmp_path / "back"), log=notes.append)
    compare_dirs(str(tmp_path / "hf"), str(tmp_path / "back"))
    if fmt == "legacy":
        assert any("optimizer" in n for n in notes), notes
    else:
        assert any("torch_dist" in n for n in notes), notes
