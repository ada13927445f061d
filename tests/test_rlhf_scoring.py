"""The RLHF trainer's per-token log-probs on the positions it reads only (in process, one rank):

- ``_token_logprobs`` with a response mask runs the output layer and the vocabulary softmax at the
  mask's positions only (``models.common.selected_logits``): the same NLL, entropy and gradients
  there as the full ``[b, s, v]`` computation, 0 elsewhere;
- ``collect`` / ``_run`` leave out the padding columns after the last response (``_width``): the
  same outputs as over the whole padded sequence;
- ``logits_at`` stays off where it would be wrong (a stage without the output layer, sequence
  parallelism);
- the no-grad scoring forward (inference-only modules) equals the training forward bit for bit
  (the first ratio of an episode is exactly 1).
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workers.convert_cases import load_converted  # noqa: E402


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    import megatron_patch  # noqa: F401

    return load_converted(tmp_path_factory.mktemp("rlhf_scoring"), "llama")


def _token_logprobs(*a):
    from megatron_patch.rlhf.trainer import _token_logprobs as fn

    return fn(*a)


def _batch(vocab, seed=0):
    """Right-padded rows of prompt + response (the trainer's layout) and their response masks."""
    g = torch.Generator().manual_seed(seed)
    seq, pad = 40, 0
    rows = [(5, 9), (11, 4), (3, 0), (17, 14)]  # (prompt, response) lengths; one empty response
    tokens = torch.full((len(rows), seq), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), seq)
    for i, (p, r) in enumerate(rows):
        tokens[i, :p + r] = torch.randint(3, vocab, (p + r,), generator=g)
        mask[i, p - 1:p - 1 + r] = 1.0
    return tokens, mask, torch.arange(seq).expand(len(rows), -1).clone()


def test_logprobs_at_the_mask_equal_the_full_computation(lm):
    model = lm.model
    model.train()
    tokens, mask, pos = _batch(lm.vocab_size)
    limit = lm.vocab_size - 7  # padding columns of the vocabulary are left out of the softmax
    outs = []
    for fn in (_full, _token_logprobs):
        model.zero_grad()
        nll, ent = fn(model, tokens, pos, "grad", limit, mask)
        ((nll * mask).sum() + (ent * mask).sum() * 0.5).backward()
        outs.append((nll.detach(), ent.detach(), model.output_layer.weight.grad.clone(),
                     model.embedding.word_embeddings.weight.grad.clone()))
    (nll_f, ent_f, gw_f, ge_f), (nll_s, ent_s, gw_s, ge_s) = outs
    on = mask > 0
    assert on.sum() == 27
    torch.testing.assert_close(nll_s[on], nll_f[on], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent_s[on], ent_f[on], rtol=1e-5, atol=1e-6)
    assert (nll_s[~on] == 0).all() and (ent_s[~on] == 0).all()
    torch.testing.assert_close(gw_s, gw_f, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ge_s, ge_f, rtol=1e-4, atol=1e-7)
    model.eval()


def _full(model, tokens, pos, entropy, limit, mask):
    """The [b, s, v] computation (the selection forced off), entropy at the mask's positions."""
    from megatron_patch.models.common import selected_logits
    from megatron_patch.rlhf.trainer import _token_logprobs

    saved = selected_logits.supported
    selected_logits.supported = lambda m: False
    try:
        return _token_logprobs(model, tokens, pos, entropy, limit, mask)
    finally:
        selected_logits.supported = saved


def test_collect_without_the_padding_columns_equals_the_whole_sequence(lm, monkeypatch):
    from megatron_patch.rlhf import trainer as T

    tokens, mask, pos = _batch(lm.vocab_size, seed=1)
    seq = tokens.shape[1]
    role = T.Role("policy", None, None, [lm.model], lm.vocab_size, vocab_limit=lm.vocab_size)
    assert T._width(role, mask, seq) == 17 + 14  # the longest row: through its last token
    assert T._width(role, mask[2:3], seq) == 1  # an empty response: the first column
    got, seen_now = {}, []
    real = T._token_logprobs

    def spy(model, tok, *a, **k):  # the columns each micro-batch goes through the model with
        seen_now.append(tok.shape[1])
        return real(model, tok, *a, **k)

    monkeypatch.setattr(T, "_token_logprobs", spy)
    for name, width in (("trimmed", T._width), ("whole", lambda r, m, s: s)):
        monkeypatch.setattr(T, "_width", width)
        exp = {"tokens": tokens, "mask": mask, "position_ids": pos}
        seen_now = []
        T.collect(role, exp, "lp", micro=2, seq=seq, transform=lambda o: -o)
        got[name] = (exp["lp"], list(seen_now))
    (trim, w_trim), (whole, w_whole) = got["trimmed"], got["whole"]
    assert w_trim == [31, 31] and w_whole == [40, 40]
    assert trim.shape == whole.shape == (4, 40)
    on = mask > 0
    torch.testing.assert_close(trim[on], whole[on], rtol=1e-5, atol=1e-6)
    assert (trim[~on] == 0).all() and (whole[~on] == 0).all()


def test_selection_off_where_it_would_be_wrong(lm):
    from megatron_patch.models.common.selected_logits import logits_at

    rows, cols = torch.tensor([0]), torch.tensor([1])
    with logits_at(lm.model, rows, cols) as on:
        assert on
    out = lm.model.output_layer
    out.sequence_parallel = True  # the decoder's output would be a shard of the sequence
    try:
        with logits_at(lm.model, rows, cols) as on:
            assert not on
    finally:
        out.sequence_parallel = False
    lm.model.post_process = False  # a pipeline stage without the output layer
    try:
        with logits_at(lm.model, rows, cols) as on:
            assert not on
    finally:
        lm.model.post_process = True


def test_a_batch_without_response_tokens(lm):
    """Every response empty (EOS first): no selected position; zeros, and a backward still runs."""
    from megatron_patch.rlhf.trainer import _token_logprobs

    model = lm.model
    model.train()
    tokens, mask, pos = _batch(lm.vocab_size, seed=2)
    empty = torch.zeros_like(mask)
    model.zero_grad()
    nll, ent = _token_logprobs(model, tokens, pos, "grad", lm.vocab_size, empty)
    assert nll.shape == ent.shape == mask.shape and not nll.any() and not ent.any()
    (nll.sum() + ent.sum()).backward()
    assert not model.output_layer.weight.grad.any()
    model.eval()


@pytest.mark.parametrize("ffn", [176, 128], ids=["ffn176_fused_mlp", "ffn128_split_mlp"])
def test_scoring_forward_equals_the_training_forward(tmp_path_factory, ffn):
    """The old log-probs (a no-grad scoring forward through the inference-only modules, with and
    without the entropy) equal the log-probs of the training forward (megatron-core's modules,
    autograd on) of the same weights bit for bit, so an episode's first ratio is exactly 1 and
    GRPO's first training step can stand in for the scoring forward. FFN 176 takes megatron-core's
    fused MLP (gate and up as two GEMMs rounds differently there), FFN 128 the split one."""
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.generation.loader import load_for_generation
    from tests.workers.convert_cases import _llama, build_hf

    work = tmp_path_factory.mktemp(f"scoring_ffn{ffn}")
    hf, mg = str(work / "hf"), str(work / "mg")
    build_hf(_llama(intermediate_size=ffn), hf)
    hf_to_megatron(hf, mg, tp=1, log=lambda *a: None)
    lm = load_for_generation(mg, flash=True, log=lambda *a: None, inference=True)
    model = lm.model
    limit = lm.vocab_size - 7
    for seed in range(3):
        tokens, mask, pos = _batch(lm.vocab_size, seed)
        model.train()
        train = _token_logprobs(model, tokens, pos, None, limit, mask).detach()
        model.eval()
        with torch.no_grad():
            score = _token_logprobs(model, tokens, pos, None, limit, mask)
            score_ent, _ = _token_logprobs(model, tokens, pos, "metric", limit, mask)
        assert torch.equal(score, train), (seed, (score - train).abs().max())
        assert torch.equal(score_ent, train), (seed, (score_ent - train).abs().max())
