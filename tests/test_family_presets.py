"""Family registry checks (single process, no conversion): every family is found from its HF
config, its presets build in transformers at their published sizes, its tiny preset is small, its
config table accepts every preset, ALiBi slopes match transformers', and layouts that do not divide
the heads are refused.
"""
import pytest

FAMILIES = ["llama", "qwen2", "mistral", "mixtral", "bloom", "falcon", "glm", "galactica"]

# published parameter counts (billions) of named presets, checked within 3 %
SIZES = {
    ("llama", "7B"): 6.74, ("llama", "13B"): 13.0, ("llama", "70B"): 69.0,
    ("qwen2", "0.5B"): 0.49, ("qwen2", "1.5B"): 1.54, ("qwen2", "7B"): 7.62,
    ("mistral", "7B"): 7.24, ("mixtral", "8x7B"): 46.7,
    ("bloom", "1.1B"): 1.07, ("bloom", "1.7B"): 1.72, ("bloom", "7.1B"): 7.07,
    ("falcon", "7B"): 6.92, ("falcon", "40B"): 41.8,
    ("glm", "9B"): 9.4, ("galactica", "1.3B"): 1.32, ("galactica", "6.7B"): 6.66,
}


def _hf_params(cfg: dict) -> int:
    import torch
    import transformers as T

    c = T.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        m = T.AutoModelForCausalLM.from_config(c)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_found_and_presets_parse(family):
    from megatron_patch.models.builder import check_parallel
    from megatron_patch.models.registry import family_for_hf_config, get_family

    fam = get_family(family)
    assert fam.mapping is not None and "tiny" in fam.presets
    for name, cfg in fam.presets.items():
        assert family_for_hf_config(cfg).name == family, name
        arch = fam.config_table.to_megatron(cfg)
        check_parallel(arch, 1, 1)
        rows = fam.mapping.rows(arch)
        assert rows and len({r.mg for r in rows}) == len(rows)


@pytest.mark.parametrize("family,preset", sorted(SIZES))
def test_preset_sizes(family, preset):
    from megatron_patch.models.registry import get_family

    n = _hf_params(get_family(family).preset(preset)) / 1e9
    assert abs(n - SIZES[(family, preset)]) / SIZES[(family, preset)] < 0.03, n


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_is_tiny(family):
    from megatron_patch.models.registry import get_family

    cfg = get_family(family).preset("tiny")
    total = _hf_params(cfg)
    hidden = cfg["hidden_size"]
    embeddings = cfg["vocab_size"] * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
    assert total - embeddings < 1_000_000  # the vocabulary is set by the tokenizer in use


@pytest.mark.parametrize("heads", [4, 6, 12, 16, 71])
def test_alibi_slopes_match_transformers(heads):
    import torch
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    from megatron_patch.models.common.alibi import alibi_slopes

    ref = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), heads, torch.float32)
    assert torch.equal(ref.view(heads, 2)[:, 1], alibi_slopes(heads))


def test_layouts_that_do_not_divide_are_refused():
    from megatron_patch.convert.engine import check_layout
    from megatron_patch.convert.rules import ConversionError
    from megatron_patch.models.registry import get_family

    falcon7 = get_family("falcon").config_table.to_megatron(get_family("falcon").preset("7B"))
    with pytest.raises(ConversionError, match="71 attention heads"):
        check_layout(falcon7, 2, 1, 1)
    glm = get_family("glm").config_table.to_megatron(get_family("glm").preset("9B"))
    check_layout(glm, 8, 1, 1)  # 2 KV groups replicated over TP=8
    mixtral = get_family("mixtral").config_table.to_megatron(get_family("mixtral").preset("8x7B"))
    check_layout(mixtral, 2, 4, 8)
    with pytest.raises(ConversionError, match="experts"):
        check_layout(mixtral, 1, 1, 3)
    llama = get_family("llama").config_table.to_megatron(get_family("llama").preset("7B"))
    with pytest.raises(ConversionError, match="without experts"):
        check_layout(llama, 1, 1, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_config_flags_keep_the_logits(family, monkeypatch):
    """The kernel-fusion flags a GPU run gets (bias+activation, bias+dropout+add) must be ones the
    family's MLP supports and must not change its arithmetic: built here on the CPU, the model with
    the GPU flags gives the logits of the model with the CPU flags (same weights)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    import megatron_patch  # noqa: F401
    from megatron_patch import platform
    from megatron_patch.models import builder
    from megatron_patch.models.registry import get_family

    platform.init_process_group()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    arch = builder.arch_from_hf(get_family(family).preset("tiny"))
    cpu_cfg = builder.transformer_config(arch)
    monkeypatch.setattr(builder.platform, "use_cuda", lambda: True)
    gpu_cfg = builder.transformer_config(arch)
    monkeypatch.undo()
    assert gpu_cfg.bias_dropout_fusion and not cpu_cfg.bias_activation_fusion
    out = []
    for cfg in (cpu_cfg, gpu_cfg):
        model_parallel_cuda_manual_seed(3)
        torch.manual_seed(3)
        model = builder.build_gpt_model(arch, cfg, use_te=False).eval()
        ids = torch.arange(1, 17).view(1, 16) % model.vocab_size
        pos = torch.arange(16).view(1, 16)
        with torch.no_grad():
            out.append(model(ids, pos, attention_mask=None))
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-6)
