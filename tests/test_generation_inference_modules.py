"""The inference-only modules of generation builds (``models.common.inference``: a KV cache of
rotated keys, linears without autograd wrappers) give bit-identical tokens and log-probs to
megatron-core's own modules (``load_for_generation(..., inference=False)``) on the same checkpoint:
left-padded and right-padded (sliding window) batches, SDPA and local core attention, RoPE (full
and partial), learned positions, ALiBi, gated and plain MLPs, a reused context; and the same
logits and gradients in a training-mode forward with autograd (where they defer to their
megatron-core bases).
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workers.convert_cases import load_converted  # noqa: E402

CASES_RUN = ["llama", "llama_mqa_tied", "mistral", "glm", "galactica", "falcon_40b", "falcon_rw"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("geninf")


def _pair(work, case, flash):
    import megatron_patch  # noqa: F401

    return (load_converted(work, case, flash), load_converted(work, case, flash, inference=False))


def _prompts(vocab, lens=(3, 9, 5, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("flash", [False, True], ids=["local", "flash"])
@pytest.mark.parametrize("case", CASES_RUN)
def test_rotated_key_cache_equals_megatron_core_cache(work, case, flash):
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.models.common.inference import (
        InferenceColumnParallelLinear,
        InferenceMLP,
        InferenceRowParallelLinear,
        InferenceVocabParallelEmbedding,
        RotatedKVSelfAttention,
    )

    fast, ref = _pair(work, case, flash)
    kinds = {type(m) for m in fast.model.modules()}
    assert {RotatedKVSelfAttention, InferenceColumnParallelLinear,
            InferenceRowParallelLinear, InferenceMLP} <= kinds
    assert type(fast.model.output_layer) is InferenceColumnParallelLinear
    assert type(fast.model.embedding.word_embeddings) is InferenceVocabParallelEmbedding
    assert not any(type(m).__module__.endswith("common.inference") for m in ref.model.modules())
    for lens in ((3, 9, 5, 12), (7, 7, 7)):  # mixed lengths (left or right padding), equal
        prompts = _prompts(fast.vocab_size, lens)
        params = SamplingParams(max_new_tokens=12, greedy=True, return_logprobs=True)
        a = generate(fast.model, prompts, params, vocab_size=fast.vocab_size)
        b = generate(ref.model, prompts, params, vocab_size=ref.vocab_size)
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.logprobs, b.logprobs)  # bitwise: same operations, same order


def test_reused_context_holds_rotated_keys_and_training_forward_unchanged(work):
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.models.common.inference import CACHE_KEY

    fast, ref = _pair(work, "llama", True)
    prompts = _prompts(fast.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=8, greedy=True, return_logprobs=True)
    ctx = StaticInferenceContext(len(prompts), 64)
    a = generate(fast.model, prompts, params, vocab_size=fast.vocab_size, inference_context=ctx)
    assert ctx.key_value_memory_dict and all(k[0] == CACHE_KEY for k in ctx.key_value_memory_dict)
    a2 = generate(fast.model, prompts, params, vocab_size=fast.vocab_size, inference_context=ctx)
    b = generate(ref.model, prompts, params, vocab_size=ref.vocab_size)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a2.tokens, b.tokens)
    # autograd on, no inference context: the megatron-core code paths, same logits and gradients;
    # 64 tokens = the context's length, so the rotary table megatron-core cached while generating
    # (under torch.inference_mode) is the one this training forward reads
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, fast.vocab_size, (1, 64), generator=g)
    pos = torch.arange(ids.shape[1])[None]
    outs = []
    for lm in (fast, ref):
        lm.model.train()
        lm.model.zero_grad()
        logits = lm.model(ids, pos, None)
        logits.float().square().mean().backward()
        grad = lm.model.decoder.layers[0].self_attention.linear_qkv.weight.grad.clone()
        outs.append((logits.detach(), grad))
        lm.model.eval()
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)


def test_sdpa_gqa_without_repeat_equals_repeated_kv(work):
    """SDPAttention without autograd on a CPU lets the kernel read each KV group for its query
    heads (enable_gqa) instead of repeating K/V: bitwise the same output."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_patch.models.common.modules import SDPAttention

    fast, _ = _pair(work, "llama_mqa_tied", True)
    core = fast.model.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, SDPAttention)
    np_, hn = core.num_heads, core.hidden_per_head
    g = torch.Generator().manual_seed(5)
    for groups in (1, 2):
        for sq, sk, kind, mask in ((7, 7, AttnMaskType.causal, None),
                                   (1, 9, AttnMaskType.no_mask, None),
                                   (1, 9, AttnMaskType.no_mask,
                                    torch.rand(3, 1, 1, 9, generator=g) < 0.3)):
            q = torch.randn(sq, 3, np_, hn, generator=g)
            k, v = (torch.randn(sk, 3, groups, hn, generator=g) for _ in range(2))
            ref = core(q, k, v, mask, attn_mask_type=kind)  # autograd on: repeated K/V
            with torch.inference_mode():
                out = core(q, k, v, mask, attn_mask_type=kind)
            assert torch.equal(out, ref)


def test_plain_cache_layout_for_other_core_attentions(work, monkeypatch):
    """Core attentions this package does not know (Transformer Engine's) get the rotated keys in
    megatron-core's own [S, B, ng, hn] layout: same tokens and log-probs."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.models.common import inference

    class Unknown:
        pass

    monkeypatch.setattr(inference, "SDPAttention", Unknown)
    monkeypatch.setattr(inference, "DotProductAttention", Unknown)
    fast, ref = _pair(work, "llama", True)
    prompts = _prompts(fast.vocab_size, seed=7)
    params = SamplingParams(max_new_tokens=8, greedy=True, return_logprobs=True)
    ctx = StaticInferenceContext(len(prompts), 40)
    a = generate(fast.model, prompts, params, vocab_size=fast.vocab_size, inference_context=ctx)
    b = generate(ref.model, prompts, params, vocab_size=ref.vocab_size)
    assert all(k.is_contiguous() for k, _ in ctx.key_value_memory_dict.values())
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("case", ["llama", "falcon_rw"])
def test_no_grad_scoring_forward_equals_megatron_core(work, case):
    """A forward without an inference context and without autograd (how the RLHF roles, built
    with these modules, score a batch; and a generation of one prompt) gives the logits of
    megatron-core's modules bit for bit, at batch 1 too, where the embedding hands the layers a
    [s, 1, h] tensor with a stale batch stride: megatron-core's linear takes it through its TP
    copy (an autograd function, which returns a ``view_as`` with plain strides), and torch.matmul
    on the two layouts can round differently (seen on the RLHF test model: PPO's first-episode KL
    between a policy and its identical reference was 2e-6 instead of 0, test_rlhf_run)."""
    from megatron_patch.generation import SamplingParams, generate

    fast, ref = _pair(work, case, False)
    g = torch.Generator().manual_seed(11)
    lin = [m.decoder.layers[0].self_attention.linear_qkv for m in (fast.model, ref.model)]
    h = lin[0].input_size
    for s in (1, 5, 27, 64):  # the layer itself, on the embedding's layout [1, s, h] -> [s, 1, h]
        x = torch.randn(1, s, h, generator=g).transpose(0, 1)
        with torch.no_grad():
            a, r = (m(x)[0] for m in lin)
        assert torch.equal(a, r), (s, (a - r).abs().max())
    for b, s in ((1, 27), (1, 64), (3, 19)):
        ids = torch.randint(3, fast.vocab_size, (b, s), generator=g)
        pos = torch.arange(s).expand(b, -1)
        with torch.no_grad():
            a, r = fast.model(ids, pos, None), ref.model(ids, pos, None)
        assert torch.equal(a, r), (b, s, (a - r).abs().max())
    params = SamplingParams(max_new_tokens=10, greedy=True, return_logprobs=True)
    prompt = _prompts(fast.vocab_size, (9,), seed=12)
    a = generate(fast.model, prompt, params, vocab_size=fast.vocab_size)
    r = generate(ref.model, prompt, params, vocab_size=ref.vocab_size)
    assert torch.equal(a.tokens, r.tokens) and torch.equal(a.logprobs, r.logprobs)


def test_gated_mlp_split_only_where_bitwise(work, monkeypatch):
    """InferenceMLP runs gate and up as two GEMMs only for an FFN width that is a multiple of
    SPLIT_MULTIPLE (128 here: the split route), where the activation rounds as on the fused
    output's strided gate half; other widths (200: torch's CPU silu rounds a row's remainder past
    the last pair of SIMD vectors differently) take megatron-core's fused GEMM. Both give
    megatron-core's MLP output bit for bit."""
    from megatron.core.transformer.mlp import MLP

    from megatron_patch.models.common.inference import SPLIT_MULTIPLE, InferenceMLP

    fast, _ = _pair(work, "llama", False)
    base = fast.model.decoder.layers[0].mlp
    assert type(base) is InferenceMLP
    h = base.linear_fc1.input_size
    fused_calls = []
    real = MLP.forward
    monkeypatch.setattr(MLP, "forward", lambda self, *a, **k: fused_calls.append(1) or
                        real(self, *a, **k))
    g = torch.Generator().manual_seed(13)
    fc1, fc2 = base.linear_fc1, base.linear_fc2  # resized here, restored after
    keep = {"fc1": (fc1.weight, fc1.output_size_per_partition, fc1.output_size),
            "fc2": (fc2.weight, fc2.input_size_per_partition, fc2.input_size)}
    try:
        for f, split in ((2 * SPLIT_MULTIPLE, True), (200, False)):
            fc1.weight = torch.nn.Parameter(torch.randn(2 * f, h, generator=g))
            fc1.output_size_per_partition = fc1.output_size = 2 * f
            fc2.weight = torch.nn.Parameter(torch.randn(h, f, generator=g))
            fc2.input_size_per_partition = fc2.input_size = f
            for s, b in ((1, 8), (30, 4)):
                x = torch.randn(s, b, h, generator=g) * 3
                fused_calls.clear()
                with torch.no_grad():
                    got = base(x)[0]
                    want = real(base, x)[0]  # megatron-core's MLP.forward on the same module
                assert torch.equal(got, want), (f, s, b, (got - want).abs().max())
                assert (len(fused_calls) == 0) == split, (f, fused_calls)
    finally:
        fc1.weight, fc1.output_size_per_partition, fc1.output_size = keep["fc1"]
        fc2.weight, fc2.input_size_per_partition, fc2.input_size = keep["fc2"]
