"""Packing keeps samples apart: the logits of a packed row (positions restarting per sample, the
block-diagonal causal mask the SFT dataset builds) equal the logits of each sample run alone, and
the SFT forward step's loss on the packed row equals the token-sum over the separate rows."""
import pytest
import torch


@pytest.fixture(scope="module")
def model():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import megatron_patch  # noqa: F401
    from megatron_patch import platform
    from megatron_patch.models.builder import arch_from_hf, build_gpt_model, transformer_config
    from megatron_patch.models.llama.config import PRESETS

    platform.init_process_group()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    arch = arch_from_hf(dict(PRESETS["tiny"], vocab_size=256))
    m = build_gpt_model(arch, transformer_config(arch), vocab_size=256, use_te=False).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # make attention matter
    return m


def test_packed_row_equals_separate_samples(model):
    from megatron_patch.data.sft import collate, make_packed_sample
    from megatron_patch.training.finetune import sft_forward_step

    g = torch.Generator().manual_seed(0)
    parts = []
    for n, prompt in ((9, 3), (14, 5), (6, 2)):
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        labels = [-100] * (prompt - 1) + ids[prompt:]  # shifted: predict ids[1:], prompt masked
        parts.append((ids[:-1], labels))
    L = 32
    packed = make_packed_sample(parts, L, pad_id=0, create_attention_mask=True)
    batch = collate([packed])
    assert batch["attention_mask"].shape == (1, 1, L, L)
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])  # [1, L, V]
        start = 0
        for tokens, _ in parts:
            n = len(tokens)
            alone = model(torch.tensor([tokens]), torch.arange(n).view(1, n), None)
            torch.testing.assert_close(logits[:, start:start + n], alone)
            start += n
        # without the mask the later samples see the earlier ones: the check above can fail
        leaky = model(batch["tokens"], batch["position_ids"], None)
        assert not torch.allclose(leaky[:, 8:21], logits[:, 8:21], atol=1e-4)

        # the SFT step's loss: the token-sum over the trained positions of all three samples
        output, loss_func = sft_forward_step(iter([batch]), model)
        loss_sum, n_tok, _ = loss_func(output)
        ref_sum, ref_n = 0.0, 0
        for tokens, labels in parts:
            n = len(tokens)
            lab = torch.tensor([labels])
            per_tok = model(torch.tensor([tokens]), torch.arange(n).view(1, n), None,
                            labels=lab.clamp(min=0))
            ref_sum += (per_tok * (lab != -100)).sum().item()
            ref_n += int((lab != -100).sum())
    assert int(n_tok) == ref_n
    assert abs(loss_sum.item() - ref_sum) <= 1e-5 * ref_sum
