"""GPU paths of the training engine (skipped without a CUDA GPU): bf16 + fused attention training
learns and reports TFLOP/s; MEGATRON_PATCH_DEVICE=cpu forces the CPU path on a GPU machine; TP=1
logits of the SDPA (flash) core attention match the unfused one in bf16."""
import json
import os

import pytest

from megatron_patch.launch import launch_local

pytestmark = pytest.mark.gpu

BASE = ["-m", "megatron_patch.training.pretrain", "--mock-data", "--vocab-size", "1024",
        "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--lr", "2e-3", "--eval-interval", "0"]


def _records(log):
    with open(os.path.join(log, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_bf16_flash_training_learns(tmp_path):
    log = str(tmp_path / "log")
    launch_local(BASE + ["--bf16", "--use-flash-attn", "--train-iters", "30", "--log-dir", log], 1)
    recs = _records(log)
    assert len(recs) == 30
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 0.5
    assert all(r["tflops_per_gpu"] > 0 for r in recs)


def test_forced_cpu_on_gpu_machine(tmp_path):
    log = str(tmp_path / "log")
    outs = launch_local(BASE + ["--train-iters", "2", "--log-dir", log], 1,
                        env={"MEGATRON_PATCH_DEVICE": "cpu"})
    assert "| cpu |" in outs[0]
    assert len(_records(log)) == 2


def test_sdpa_matches_local_attention_bf16():
    import megatron_patch  # noqa: F401
    import torch
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_patch import platform
    from megatron_patch.models.builder import arch_from_hf, build_gpt_model, transformer_config
    from megatron_patch.models.llama.config import PRESETS

    platform.init_process_group()
    parallel_state.initialize_model_parallel(1, 1)
    try:
        model_parallel_cuda_manual_seed(3)
        hf = dict(PRESETS["tiny"], vocab_size=512)
        arch = arch_from_hf(hf)
        cfg = transformer_config(arch, precision="bf16")
        a = build_gpt_model(arch, cfg, flash=False).eval()
        b = build_gpt_model(arch, cfg, flash=True).eval()
        b.load_state_dict(a.state_dict())
        ids = torch.randint(0, 512, (2, 128), device="cuda")
        pos = torch.arange(128, device="cuda").unsqueeze(0).expand(2, -1)
        with torch.no_grad():
            la, lb = a(ids, pos, None).float(), b(ids, pos, None).float()
        torch.testing.assert_close(lb, la, atol=1e-2, rtol=1e-2)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
