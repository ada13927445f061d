"""Generation on one process (TP=1): greedy tokens equal ``transformers`` ``generate(do_sample=False)``
for every family on converted weights, for a batch mixing prompt lengths; KV-cache decoding equals
recomputation without a cache; batched (padded) rows equal their unpadded runs; returned log-probs
equal a forward pass's log-softmax; seeded sampling is reproducible; top-k = 1 is greedy; the
repetition penalty matches transformers'; a live model in training mode stays in training mode.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workers.convert_cases import CASES, build_hf  # noqa: E402

NEW = 10
PROMPT_LENS = (3, 9, 5, 12)
FAMILIES = ["llama", "llama_mqa_tied", "qwen2", "mistral", "mixtral", "glm", "galactica", "bloom",
            "falcon_7b", "falcon_40b", "falcon_rw"]


def _prompts(vocab, lens=PROMPT_LENS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gen")


_MODELS = {}


def _model(work, case, flash=False):
    """(LoadedModel, HF model) for a conversion case, built once per module (and attention kind)."""
    if (case, flash) in _MODELS:
        return _MODELS[(case, flash)]
    import transformers as T

    import megatron_patch  # noqa: F401
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.generation.loader import load_for_generation

    cfg, opts = CASES[case]
    hf_dir, mg_dir = str(work / f"{case}_hf"), str(work / f"{case}_mg")
    if not os.path.isdir(mg_dir):
        build_hf(cfg, hf_dir)
        hf_to_megatron(hf_dir, mg_dir, tp=1, log=lambda *a: None)
    lm = load_for_generation(mg_dir, flash=flash, log=lambda *a: None)
    hf = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                attn_implementation=opts.get("attn", "eager")).eval()
    hf.generation_config.eos_token_id = None  # run the full length, as generate() without stops
    _MODELS[(case, flash)] = (lm, hf)
    return lm, hf


def _hf_greedy(hf, prompt, new=NEW, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new,
                          pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("flash", [False, True], ids=["local", "flash"])
@pytest.mark.parametrize("case", FAMILIES)
def test_greedy_equals_transformers_mixed_lengths(work, case, flash):
    """flash: the SDPA core attention where the family allows it (the CLI's default)."""
    from megatron_patch.generation import SamplingParams, generate

    lm, hf = _model(work, case, flash)
    prompts = _prompts(lm.vocab_size)
    out = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True),
                   vocab_size=lm.vocab_size)
    assert out.lengths.tolist() == [NEW] * len(prompts)
    for i, p in enumerate(prompts):
        assert out.row(i) == _hf_greedy(hf, p), f"{case} row {i} (prompt length {len(p)})"


def _recompute_greedy(model, prompt, new, vocab):
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    from megatron_patch.generation.engine import inference_mode

    ids = list(prompt)
    logits_seen = []
    dev = next(model.parameters()).device
    with inference_mode(model):
        for _ in range(new):
            x = torch.tensor([ids], device=dev)
            pos = torch.arange(len(ids), device=dev).unsqueeze(0)
            logits = model(x, pos, None, runtime_gather_output=True)[0, -1, :vocab].cpu()
            logits_seen.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], torch.stack(logits_seen)


@pytest.mark.parametrize("case", ["llama", "bloom", "galactica"])
def test_kv_cache_equals_recompute_and_padded_rows_equal_unpadded(work, case):
    from megatron_patch.generation import SamplingParams, generate

    lm, _ = _model(work, case)
    prompts = _prompts(lm.vocab_size, seed=1)
    params = SamplingParams(max_new_tokens=NEW, greedy=True)
    batch = generate(lm.model, prompts, params, vocab_size=lm.vocab_size)
    for i, p in enumerate(prompts):
        ref, ref_logits = _recompute_greedy(lm.model, p, NEW, lm.vocab_size)
        assert batch.row(i) == ref
        lp = torch.log_softmax(ref_logits.float(), -1).gather(-1, torch.tensor(ref)[:, None])[:, 0]
        torch.testing.assert_close(batch.logprobs[i], lp)
        single = generate(lm.model, [p], params, vocab_size=lm.vocab_size)
        assert single.row(0) == batch.row(i)
        torch.testing.assert_close(single.logprobs[0], batch.logprobs[i])


def test_logprobs_equal_forward_log_softmax_when_sampling(work):
    from megatron_patch.generation import SamplingParams, forward_logprobs, generate

    lm, _ = _model(work, "llama")
    prompts = _prompts(lm.vocab_size, seed=2)
    params = SamplingParams(max_new_tokens=NEW, temperature=0.8, top_k=20, top_p=0.9, seed=7,
                            repetition_penalty=1.1)
    out = generate(lm.model, prompts, params, vocab_size=lm.vocab_size)
    for i, p in enumerate(prompts):
        seq = torch.tensor([p + out.row(i)])
        ref = forward_logprobs(lm.model, seq, lm.vocab_size)[0, len(p) - 1:]  # [NEW]
        torch.testing.assert_close(out.logprobs[i], ref)
    ids, mask = out.sequences(prompts)
    assert ids.shape == (4, max(PROMPT_LENS) + NEW) and int(mask.sum()) == sum(PROMPT_LENS) + 4 * NEW


def test_seeded_sampling_reproducible_and_top_k_1_is_greedy(work):
    from megatron_patch.generation import SamplingParams, generate

    lm, _ = _model(work, "llama")
    prompts = _prompts(lm.vocab_size, seed=3)
    run = lambda **kw: generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, **kw),
                                vocab_size=lm.vocab_size)
    a, b, c = run(seed=11), run(seed=11), run(seed=12)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    greedy = run(greedy=True)
    assert torch.equal(run(top_k=1, seed=5).tokens, greedy.tokens)
    assert torch.equal(run(temperature=0.0).tokens, greedy.tokens)
    assert all(0 <= t < lm.vocab_size for t in a.tokens.flatten().tolist())


def test_repetition_penalty_matches_transformers(work):
    from megatron_patch.generation import SamplingParams, generate

    lm, hf = _model(work, "llama")
    prompts = _prompts(lm.vocab_size, seed=4)
    out = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True,
                                                     repetition_penalty=1.5),
                   vocab_size=lm.vocab_size)
    plain = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True),
                     vocab_size=lm.vocab_size)
    assert not torch.equal(out.tokens, plain.tokens)  # the penalty changes something here
    for i, p in enumerate(prompts):
        assert out.row(i) == _hf_greedy(hf, p, repetition_penalty=1.5)


def test_stop_tokens_stop_fn_and_training_mode_restored(work):
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.engine import unwrap

    lm, _ = _model(work, "llama")
    prompts = _prompts(lm.vocab_size, seed=5)
    full = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True),
                    vocab_size=lm.vocab_size)
    stop = full.row(0)[3]
    cut = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True,
                                                     stop_token_ids=[stop]),
                   vocab_size=lm.vocab_size, pad_id=0)
    for i in range(len(prompts)):
        row = full.row(i)
        expect = row[: row.index(stop) + 1] if stop in row else row
        assert cut.row(i) == expect
        assert cut.finish_reasons[i] == ("stop_token" if stop in row else "length")
        assert cut.tokens[i, len(expect):].eq(0).all()
    # stop_fn ends row 1 after 2 tokens; training mode of a live model is restored afterwards
    lm.model.train()
    out = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True),
                   vocab_size=lm.vocab_size, stop_fn=lambda i, ids: i == 1 and len(ids) == 2)
    assert lm.model.training and unwrap(lm.model) is lm.model
    lm.model.eval()
    assert out.row(1) == full.row(1)[:2] and out.finish_reasons[1] == "stop"
    assert out.row(2) == full.row(2)


def test_reused_inference_context_and_errors(work):
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_patch.generation import SamplingParams, generate

    lm, _ = _model(work, "llama")
    prompts = _prompts(lm.vocab_size, seed=6)
    params = SamplingParams(max_new_tokens=NEW, greedy=True)
    ctx = StaticInferenceContext(len(prompts), 64)
    a = generate(lm.model, prompts, params, vocab_size=lm.vocab_size, inference_context=ctx)
    b = generate(lm.model, prompts, params, vocab_size=lm.vocab_size, inference_context=ctx)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="at least one token"):
        generate(lm.model, [[1, 2], []], params)
    with pytest.raises(ValueError, match="exceeds"):
        generate(lm.model, [[1] * 20], params, max_sequence_length=25)
    with pytest.raises(ValueError):
        SamplingParams(top_p=1.5)


def test_bf16_model_wrapped_in_float16module(work):
    """A bf16 live model as training wraps it (Float16Module): generation runs through the wrapper,
    returns float32 log-probs close to the fp32 model's, and agrees on the first greedy tokens."""
    from megatron.core.transformer.module import Float16Module

    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.loader import load_for_generation

    lm32, _ = _model(work, "llama")
    lm16 = load_for_generation(str(work / "llama_mg"), precision="bf16", log=lambda *a: None)
    wrapped = Float16Module(lm16.model.config, lm16.model)
    wrapped.train()
    prompts = _prompts(lm32.vocab_size, seed=8)
    params = SamplingParams(max_new_tokens=4, greedy=True)
    a = generate(wrapped, prompts, params, vocab_size=lm16.vocab_size)
    b = generate(lm32.model, prompts, params, vocab_size=lm32.vocab_size)
    assert wrapped.training and a.logprobs.dtype == torch.float32
    assert next(lm16.model.parameters()).dtype == torch.bfloat16
    assert [r[0] for r in a.tokens.tolist()] == [r[0] for r in b.tokens.tolist()]
    torch.testing.assert_close(a.logprobs[:, 0], b.logprobs[:, 0], atol=0.1, rtol=0)


class _Counting(torch.nn.Module):
    """A wrapper (unwrapped by the engine like DDP) that records the length of every forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = []

    def forward(self, ids, *args, **kwargs):
        self.calls.append(ids.shape[1])
        return self.module(ids, *args, **kwargs)


SPREAD = (1, 23, 4, 40, 2)  # very different prompt lengths


@pytest.mark.parametrize("case,flash", [("llama", False), ("llama", True), ("bloom", False),
                                        ("galactica", False), ("falcon_rw", False),
                                        ("glm", True)])
def test_left_padded_batch_equals_each_prompt_alone(work, case, flash):
    """RoPE (per-row rotary table), ALiBi (per-row key positions; Falcon-RW rounds its bias in
    bfloat16), learned positions with OPT's offset: row by row, the batch gives the greedy tokens
    and log-probs of the prompt run alone; one prefill over the longest prompt, then
    max_new_tokens - 1 decode forwards."""
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.engine import left_padding_supported

    lm, _ = _model(work, case, flash)
    assert left_padding_supported(lm.model)
    prompts = _prompts(lm.vocab_size, lens=SPREAD, seed=9)
    params = SamplingParams(max_new_tokens=NEW, greedy=True)
    counted = _Counting(lm.model)
    batch = generate(counted, prompts, params, vocab_size=lm.vocab_size)
    assert counted.calls == [max(SPREAD)] + [1] * (NEW - 1)
    assert batch.prompt_lengths.tolist() == list(SPREAD)
    assert batch.lengths.tolist() == [NEW] * len(SPREAD)
    assert batch.finish_reasons == ["length"] * len(SPREAD)
    for i, p in enumerate(prompts):
        alone = generate(lm.model, [p], params, vocab_size=lm.vocab_size)
        assert batch.row(i) == alone.row(0), f"{case} row {i} (prompt length {len(p)})"
        torch.testing.assert_close(batch.logprobs[i], alone.logprobs[0], atol=1e-5, rtol=0)
    ids, mask = batch.sequences(prompts)
    assert ids.shape == (len(SPREAD), max(SPREAD) + NEW)
    assert mask.sum(1).tolist() == [n + NEW for n in SPREAD]
    assert ids[3, :40].tolist() == prompts[3] and ids[0, 1:1 + NEW].tolist() == batch.row(0)


def test_decode_forwards_and_stops(work):
    """max_new_tokens forwards in all (the prefill and max_new_tokens - 1 decode steps), fewer when
    every row stops early; a 1-token budget is the prefill alone. Mistral's sliding window keeps the
    right-padded scheme (its core attention replaces the mask), which reads the longer prompts one
    token per step, and still equals the single-prompt runs."""
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.engine import GPU_DONE_CHECK_EVERY, left_padding_supported

    lm, _ = _model(work, "llama")
    prompts = _prompts(lm.vocab_size, lens=SPREAD, seed=10)
    counted = _Counting(lm.model)
    full = generate(counted, prompts, SamplingParams(max_new_tokens=NEW, greedy=True),
                    vocab_size=lm.vocab_size)
    assert counted.calls == [40] + [1] * (NEW - 1)
    counted.calls.clear()
    generate(counted, prompts, SamplingParams(max_new_tokens=1, greedy=True),
             vocab_size=lm.vocab_size)
    assert counted.calls == [40]
    # every row stops at its third token: the loop ends at the next "all done?" check (after every
    # step on the CPU, every GPU_DONE_CHECK_EVERY steps on a GPU)
    counted.calls.clear()
    out = generate(counted, prompts, SamplingParams(max_new_tokens=NEW, greedy=True),
                   vocab_size=lm.vocab_size, stop_fn=lambda i, ids: len(ids) == 3)
    every = 1 if next(lm.model.parameters()).device.type == "cpu" else GPU_DONE_CHECK_EVERY
    last_step = next(k for k in range(2, NEW) if k % every == every - 1 or k == NEW - 1)
    assert counted.calls == [40] + [1] * last_step
    assert out.lengths.tolist() == [3] * len(SPREAD) and out.finish_reasons == ["stop"] * 5
    assert out.tokens[:, :3].tolist() == full.tokens[:, :3].tolist()
    assert out.tokens[:, 3:].eq(0).all()
    # stop tokens end rows at different steps; the others go on to the full length
    stop = full.row(1)[2]
    cut = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True,
                                                     stop_token_ids=[stop]),
                   vocab_size=lm.vocab_size)
    for i in range(len(prompts)):
        row = full.row(i)
        expect = row[: row.index(stop) + 1] if stop in row else row
        assert cut.row(i) == expect
        torch.testing.assert_close(cut.logprobs[i, : len(expect)], full.logprobs[i, : len(expect)])

    lm, _ = _model(work, "mistral")
    assert not left_padding_supported(lm.model)
    prompts = _prompts(lm.vocab_size, lens=(3, 9, 5), seed=11)
    counted = _Counting(lm.model)
    params = SamplingParams(max_new_tokens=NEW, greedy=True)
    batch = generate(counted, prompts, params, vocab_size=lm.vocab_size)
    assert counted.calls == [3] + [1] * (9 - 3 + NEW - 1)
    for i, p in enumerate(prompts):
        assert batch.row(i) == generate(lm.model, [p], params, vocab_size=lm.vocab_size).row(0)


def test_alibi_bf16_bias_uses_each_rows_positions(work):
    """Falcon-RW forms slope * j in bfloat16, exact only for j < 256 (power-of-two head counts):
    a short prompt left-padded past slot 256 must get its bias at its own key positions (at the
    cache slots its log-probs move by ~4e-3), and equals the prompt run alone."""
    from megatron_patch.generation import SamplingParams, generate

    lm, _ = _model(work, "falcon_rw")
    prompts = _prompts(lm.vocab_size, lens=(3, 301), seed=3)
    params = SamplingParams(max_new_tokens=4, greedy=True)
    batch = generate(lm.model, prompts, params, vocab_size=lm.vocab_size)
    alone = generate(lm.model, prompts[:1], params, vocab_size=lm.vocab_size)
    assert batch.row(0) == alone.row(0)
    torch.testing.assert_close(batch.logprobs[0], alone.logprobs[0], atol=1e-5, rtol=0)


def test_per_row_rotary_table(work):
    """While generating a left-padded batch, megatron-core's rotary table [S, 1, 1, d] (by cache
    slot) is replaced by [S, b, 1, d] with row i's slot j at position max(j - pad_i, 0); restored
    afterwards."""
    from megatron_patch.generation.engine import _row_positions

    lm, _ = _model(work, "llama")
    rope = lm.model.rotary_pos_emb
    S = 12
    base = rope(S)  # [S, 1, 1, d]
    pads = torch.tensor([0, 5, 11])
    pos = (torch.arange(S)[None] - pads[:, None]).clamp(min=0)
    with _row_positions(lm.model, pos):
        table = lm.model.rotary_pos_emb(S)
    assert table.shape == (S, 3, 1, base.shape[-1])
    for i in range(3):
        for j in range(S):
            assert torch.equal(table[j, i, 0], base[max(j - int(pads[i]), 0), 0, 0])
    assert "forward" not in rope.__dict__ and rope(S) is base
