"""Model-family settings found in review where a converted model was not the HF model: each is
now either implemented (logits equal ``transformers`` in fp32) or refused at conversion with an error
that names it, before anything is written.

- LLaMA-shaped families (LLaMA, Qwen2, Mistral, Mixtral, GLM) build SwiGLU whatever ``hidden_act``
  says: a ``gelu`` / ``gelu_pytorch_tanh`` config converted silently into a different model.
- Mixtral ``router_jitter_noise`` > 0: megatron-core jittered the router input in evaluation too
  (HF: training only), so eval / generation logits were random and differed from transformers.
- Mixtral ``num_experts_per_tok=1`` converted, then could not be built (megatron-core demands the
  pre-softmax router for top-1, which would weigh the expert by its probability, HF by 1).
- Linear RoPE scaling (``{"rope_type": "linear", "factor": f}``, long-context LLaMA-2 fine-tunes) and
  YaRN (Qwen2.5's long-context setting) were refused for every LLaMA-shaped family; both are now
  converted (Qwen2's parity case has linear scaling at every layout, the rest is checked here);
  dynamic NTK and longrope are still refused, and YaRN for GLM (interleaved RoPE).
- LLaMA ``attention_bias`` / ``mlp_bias`` ("llamafied" Qwen-1 / InternLM / Baichuan checkpoints)
  were refused; the biased linears are now given by the spec (case ``llama_bias`` has both at every
  layout; each alone is checked here).
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workers.convert_cases import VOCAB, _llama, build_hf  # noqa: E402


def _family_cfg(family, **kw):
    extra = {
        "llama": {},
        "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
        "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=8),
        "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral",
                        num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
                        intermediate_size=48),
        "glm": dict(architectures=["GlmForCausalLM"], model_type="glm", head_dim=16,
                    partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0),
    }[family]
    return _llama(**{**extra, **kw})


def _greedy_equals_hf(lm, hf, prompts, new):
    """Greedy tokens of a batch mixing prompt lengths equal transformers' ``generate`` per prompt."""
    from megatron_patch.generation import SamplingParams, generate

    out = generate(lm.model, prompts, SamplingParams(max_new_tokens=new, greedy=True),
                   vocab_size=VOCAB)
    hf.generation_config.eos_token_id = None  # the full length, as generate() without stops
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        assert out.row(i) == want, (p, out.row(i), want)


def _changed_model_converts_exactly(tmp_path, cfg, plain_cfg, inference=True):
    """The HF model of ``cfg`` differs from that of ``plain_cfg`` (same seed, same weights: the
    setting under test changes the model), and its converted megatron model gives its logits.
    Returns (loaded megatron model, HF model, the test ids [2, 24])."""
    import megatron_patch  # noqa: F401
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.generation.loader import load_for_generation

    hf = build_hf(cfg, str(tmp_path / "hf"))
    plain = build_hf(plain_cfg, str(tmp_path / "plain"))
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (ref - plain(ids).logits).abs().max() > 1e-2  # the setting changes the model
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mg"), tp=1, log=_quiet)
    lm = load_for_generation(str(tmp_path / "mg"), log=_quiet, inference=inference)
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids, pos, None)[..., :VOCAB], ref)
    return lm, hf, ids


def _quiet(*a):
    pass


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh", "relu"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "mixtral", "glm"])
def test_llama_like_non_silu_hidden_act_is_refused(family, act):
    """Before: converted into a SwiGLU model (fp32 logits off by ~0.2 from transformers')."""
    from megatron_patch.convert.engine import family_and_arch
    from megatron_patch.convert.rules import ConversionError

    with pytest.raises(ConversionError, match=f"hidden_act '{act}' is not supported"):
        family_and_arch(_family_cfg(family, hidden_act=act))
    for ok in ("silu", "swish"):  # the spellings of SwiGLU's activation still convert
        family_and_arch(_family_cfg(family, hidden_act=ok))


def test_non_silu_hidden_act_fails_before_writing(tmp_path):
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.convert.rules import ConversionError

    build_hf(_family_cfg("llama", hidden_act="gelu"), str(tmp_path / "hf"))
    with pytest.raises(ConversionError, match="hidden_act 'gelu'"):
        hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mg"), tp=1, log=_quiet)
    assert not (tmp_path / "mg").exists()


def test_mixtral_top1_is_refused_before_writing(tmp_path):
    """Before: the conversion wrote a checkpoint that no builder could load ("Please use
    --moe-router-pre-softmax when topk is 1")."""
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.convert.rules import ConversionError

    cfg = _family_cfg("mixtral")
    cfg["num_experts_per_tok"] = 1
    build_hf(cfg, str(tmp_path / "hf"))
    with pytest.raises(ConversionError, match="num_experts_per_tok=1 is not supported"):
        hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mg"), tp=1, log=_quiet)
    assert not (tmp_path / "mg").exists()


@pytest.mark.parametrize("inference", [False, True], ids=["training_modules", "inference_modules"])
def test_mixtral_router_jitter_is_training_only(tmp_path, inference):
    """Before: max |logit diff| ~0.19 in eval (megatron-core jittered the router input always)."""
    import megatron_patch  # noqa: F401
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.generation.loader import load_for_generation

    cfg = _family_cfg("mixtral", router_jitter_noise=0.1)
    hf = build_hf(cfg, str(tmp_path / "hf"))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mg"), tp=1, log=_quiet)
    lm = load_for_generation(str(tmp_path / "mg"), log=_quiet, inference=inference)
    model = lm.model
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos, None)[..., :VOCAB], ref)
        # training still jitters the router input (megatron-core's moe_input_jitter_eps)
        model.train()
        try:
            a, b = model(ids, pos, None), model(ids, pos, None)
        finally:
            model.eval()
    assert not torch.equal(a, b)


_SIZES = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=16,
              intermediate_size=96)
HAND_WRITTEN = {  # config.json as a person writes it: sizes only, every other key left out
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], **_SIZES),
    # Qwen2Config: num_key_value_heads 32 whatever the heads, rope_theta 1e4
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                  **dict(_SIZES, num_attention_heads=32)),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], **_SIZES),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], **_SIZES),
    "glm": dict(model_type="glm", architectures=["GlmForCausalLM"], pad_token_id=0, **_SIZES),
    "falcon": dict(model_type="falcon", architectures=["FalconForCausalLM"], vocab_size=VOCAB,
                   hidden_size=64, num_hidden_layers=2, num_attention_heads=8),
    "bloom": dict(model_type="bloom", architectures=["BloomForCausalLM"], vocab_size=VOCAB,
                  hidden_size=64, n_layer=2, n_head=8),
    "opt": dict(model_type="opt", architectures=["OPTForCausalLM"], vocab_size=VOCAB,
                hidden_size=64, num_hidden_layers=2, num_attention_heads=8, ffn_dim=96,
                word_embed_proj_dim=64),
}


@pytest.mark.parametrize("family", sorted(HAND_WRITTEN))
def test_hand_written_config_reads_as_transformers_reads_it(tmp_path, family):
    """A config.json that leaves keys out means the transformers config class's defaults, which
    differ by family (Mistral/Mixtral 8 KV heads, GLM 2 KV heads and head_dim 128, Mixtral eps
    1e-5 and 8 experts, Qwen2 32 KV heads and rope_theta 1e4). Before: our LLaMA defaults (a
    model that could not load its weights, or logits 0.11 off for Qwen2)."""
    import json

    import megatron_patch  # noqa: F401
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.generation.loader import load_for_generation

    cfg = HAND_WRITTEN[family]
    hf = build_hf(cfg, str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))  # not save_pretrained's
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mg"), tp=1, log=_quiet)
    lm = load_for_generation(str(tmp_path / "mg"), log=_quiet, inference=False)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids, pos, None)[..., :VOCAB], hf(ids).logits)


def test_hand_written_mistral_keeps_its_default_window():
    from megatron_patch.convert.engine import family_and_arch

    _, arch = family_and_arch(HAND_WRITTEN["mistral"])
    assert arch.config["window_size"] == (4095, 0) and arch.config["num_query_groups"] == 8
    _, arch = family_and_arch(dict(HAND_WRITTEN["mistral"], sliding_window=None))
    assert "window_size" not in arch.config  # an explicit null: no window, as transformers reads it


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral", "glm"])
def test_linear_rope_scaling_matches_transformers(tmp_path, family):
    scaling = {"rope_type": "linear", "factor": 3.0}
    _changed_model_converts_exactly(tmp_path, _family_cfg(family, rope_scaling=scaling),
                                    _family_cfg(family), inference=family != "mixtral")


@pytest.mark.parametrize("scaling,expected", [
    ({"rope_type": "dynamic", "factor": 2.0}, "only linear"),
    ({"rope_type": "longrope", "factor": 2.0}, "only linear"),
    ({"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.5}, "explicit attention_factor"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 8}, "needs a number 'factor'"),
    ({"rope_type": "linear"}, "needs a number 'factor'"),
    ({"rope_type": "linear", "factor": 0}, "must be > 0"),
])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_other_rope_scalings_are_refused(family, scaling, expected):
    from megatron_patch.convert.engine import family_and_arch

    with pytest.raises(Exception, match=expected):
        family_and_arch(_family_cfg(family, rope_scaling=scaling))


def test_yarn_is_refused_for_interleaved_rope():
    """megatron-core's YarnRotaryEmbedding does not take GLM's interleaved RoPE."""
    from megatron_patch.convert.engine import family_and_arch

    with pytest.raises(Exception, match="only linear"):
        family_and_arch(_family_cfg("glm", rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                         "original_max_position_embeddings": 8}))


@pytest.mark.parametrize("family,rope", [
    ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
    ("llama", {"type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16,
               "beta_fast": 16, "beta_slow": 2}),
    ("mistral", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                 "mscale": 0.8, "mscale_all_dim": 0.5}),
    ("mixtral", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
])
@pytest.mark.parametrize("inference", [False, True], ids=["training_modules", "inference_modules"])
def test_yarn_rope_scaling_matches_transformers(tmp_path, family, rope, inference):
    """YaRN (Qwen2.5's long-context setting) as megatron-core's YarnRotaryEmbedding: the logits equal
    transformers' (whose attention factor scales cos and sin), and greedy generation of a batch
    mixing prompt lengths equals ``generate``."""
    # MixtralConfig's head_dim None breaks transformers' own YaRN (None * 1.0): give it
    kw = {"head_dim": 16} if family == "mixtral" else {}
    lm, hf, ids = _changed_model_converts_exactly(
        tmp_path, _family_cfg(family, rope_scaling=rope, **kw), _family_cfg(family), inference)
    _greedy_equals_hf(lm, hf, [ids[0, :5].tolist(), ids[1, :11].tolist()], 12)


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
@pytest.mark.parametrize("inference", [False, True], ids=["training_modules", "inference_modules"])
def test_llama_linear_biases_match_transformers(tmp_path, bias, inference):
    """Each of LLaMA's bias switches alone: the biased linears are exactly those of the HF model
    (megatron-core's add_bias_linear would bias o_proj and the MLP together)."""
    import megatron_patch  # noqa: F401
    from megatron_patch.convert.engine import hf_to_megatron, megatron_to_hf
    from megatron_patch.generation.loader import load_for_generation

    hf = build_hf(_family_cfg("llama", **{bias: True}), str(tmp_path / "hf"))
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mg"), tp=1, log=_quiet)
    lm = load_for_generation(str(tmp_path / "mg"), log=_quiet, inference=inference)
    names = [n for n, _ in lm.model.named_parameters() if n.endswith(".bias")]
    want = ({"self_attention.linear_qkv.bias", "self_attention.linear_proj.bias"}
            if bias == "attention_bias" else {"mlp.linear_fc1.bias", "mlp.linear_fc2.bias"})
    assert {n.split(".", 3)[3] for n in names} == want, names
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids, pos, None)[..., :VOCAB], ref)
    prompts = [ids[0, :5].tolist(), ids[1, :11].tolist()]
    _greedy_equals_hf(lm, hf, prompts, 8)
    # and back: the HF weights round-trip bit for bit
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), log=_quiet)
    import transformers as T

    back = T.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32)
    for (n, a), (m, b) in zip(hf.state_dict().items(), back.state_dict().items()):
        assert n == m and torch.equal(a, b), n


@pytest.mark.parametrize("window", [
    dict(max_window_layers=1),  # layer 0 full, layer 1 windowed
    dict(max_window_layers=0),  # every layer windowed
    dict(layer_types=["sliding_attention", "full_attention"]),  # transformers 5's explicit list
])
@pytest.mark.parametrize("inference", [False, True], ids=["training_modules", "inference_modules"])
def test_qwen2_sliding_window_matches_transformers(tmp_path, window, inference):
    """use_sliding_window was refused; megatron-core's window with its per-layer list
    (window_attn_skip_freq) gives transformers' logits and greedy tokens."""
    cfg = _family_cfg("qwen2", use_sliding_window=True, sliding_window=6, **window)
    lm, hf, ids = _changed_model_converts_exactly(tmp_path, cfg, _family_cfg("qwen2"), inference)
    _greedy_equals_hf(lm, hf, [ids[0, :5].tolist(), ids[1, :11].tolist()], 10)


def test_qwen2_window_switched_off_or_malformed():
    from megatron_patch.convert.engine import family_and_arch

    _, arch = family_and_arch(_family_cfg("qwen2", use_sliding_window=False, sliding_window=6,
                                          max_window_layers=0))
    assert "window_size" not in arch.config  # transformers ignores the window then
    with pytest.raises(Exception, match="layer_types must name"):
        family_and_arch(_family_cfg("qwen2", use_sliding_window=True, sliding_window=6,
                                    layer_types=["sliding_attention"]))


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 3.0},
                                  {"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 8}])
def test_falcon_rope_scaling_matches_transformers(tmp_path, rope):
    """Falcon (RoPE, parallel attention, multi-query) refused every rope_scaling."""
    from tests.workers.convert_cases import CASES

    plain = CASES["falcon_7b"][0]
    _changed_model_converts_exactly(tmp_path, dict(plain, rope_scaling=rope), plain)