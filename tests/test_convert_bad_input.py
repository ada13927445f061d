"""Conversion inputs that used to convert into a corrupt checkpoint, delete a source or end in a
traceback: a Megatron checkpoint missing its last TP rank folder, a target equal to / inside /
holding the source, configs a family cannot take, bad environment values, a stale dtype in the
written config.json, and HF files saved from the bare base model (bigscience/bloom-*,
facebook/opt-* / galactica-*: no ``transformer.`` / ``model.`` key prefix). Tiny models, fast.
"""
import json
import os
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workers.convert_cases import CASES, _llama, build_hf  # noqa: E402

from megatron_patch.convert import cli, engine  # noqa: E402
from megatron_patch.convert.rules import ConversionError  # noqa: E402


def _quiet(*a):
    pass


def _load(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def test_a_missing_rank_folder_is_refused_not_converted_smaller(tmp_path):
    hf = str(tmp_path / "hf")
    build_hf(CASES["bloom"][0], hf)
    mg = str(tmp_path / "mg")
    engine.hf_to_megatron(hf, mg, tp=4, log=_quiet)
    it = os.path.join(mg, "release")
    shutil.rmtree(os.path.join(it, "mp_rank_03"))
    with pytest.raises(ConversionError, match="says tensor_model_parallel_size 4, but the rank "
                                              "folders make 3"):
        engine.megatron_to_hf(mg, str(tmp_path / "back"), log=_quiet)
    with pytest.raises(ConversionError, match="rank folders are missing"):
        engine.reshard(mg, str(tmp_path / "re"), tp=1, log=_quiet)
    assert not os.path.exists(tmp_path / "back") and not os.path.exists(tmp_path / "re")


def test_targets_never_touch_the_source(tmp_path, capsys):
    hf = str(tmp_path / "proj" / "hf")
    build_hf(_llama(), hf)
    before = sorted(os.listdir(hf))
    for target, how in ((hf, "is the source"), (os.path.join(hf, "mg"), "is inside the source"),
                        (str(tmp_path / "proj"), "holds the source")):
        rc = cli.main(["hf2mg", "--load-dir", hf, "--save-dir", target, "--overwrite"])
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert rc == 1 and len(errors) == 1 and how in errors[0] and "Traceback" not in err, err
        assert sorted(os.listdir(hf)) == before
    mg = str(tmp_path / "mg")
    engine.hf_to_megatron(hf, mg, log=_quiet)
    with pytest.raises(ConversionError, match="is the source"):
        engine.megatron_to_hf(mg, mg, overwrite=True, log=_quiet)
    with pytest.raises(ConversionError, match="is inside the source"):
        engine.reshard(mg, os.path.join(mg, "tp2"), tp=2, log=_quiet)
    with pytest.raises(ConversionError, match="target folder is empty"):
        engine.hf_to_megatron(hf, "", overwrite=True, log=_quiet)


@pytest.mark.parametrize("change,expected", [
    ({"hidden_act": "gelu"}, "llama config.json: LLaMA hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_config_a_family_cannot_take_is_one_line(tmp_path, capsys, change, expected):
    hf = str(tmp_path / "hf")
    build_hf(_llama(), hf)
    cfg = json.load(open(os.path.join(hf, "config.json")))
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    json.dump(cfg, open(os.path.join(hf, "config.json"), "w"))
    rc = cli.main(["hf2mg", "--load-dir", hf, "--save-dir", str(tmp_path / "mg")])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 1 and len(errors) == 1 and expected in errors[0] and "Traceback" not in err
    assert not os.path.exists(tmp_path / "mg")


def test_bad_numbers_are_refused(tmp_path, capsys, monkeypatch):
    hf = str(tmp_path / "hf")
    build_hf(_llama(), hf)
    for env, value, expected in (("EXTRA_VOCAB_SIZE", "-10", "EXTRA_VOCAB_SIZE must be an "
                                                             "integer >= 0, got '-10'"),
                                 ("EXTRA_VOCAB_SIZE", "abc", "got 'abc'"),
                                 ("EP", "two", "EP must be an integer >= 1, got 'two'")):
        monkeypatch.setenv(env, value)
        rc = cli.main(["auto", hf, str(tmp_path / "mg"), "1", "1", "false"])
        assert rc == 1 and expected in capsys.readouterr().err
        monkeypatch.delenv(env)
    with pytest.raises(ConversionError, match="extra_vocab_size must be >= 0"):
        engine.hf_to_megatron(hf, str(tmp_path / "mg"), extra_vocab_size=-10, log=_quiet)
    with pytest.raises(ConversionError, match="make_vocab_size_divisible_by must be >= 1"):
        engine.hf_to_megatron(hf, str(tmp_path / "mg"), divisible_by=0, log=_quiet)
    assert not os.path.exists(tmp_path / "mg")


def test_config_dtype_names_the_weights_written(tmp_path):
    hf = str(tmp_path / "hf")
    build_hf(_llama(), hf)  # fp32
    mg = str(tmp_path / "mg")
    engine.hf_to_megatron(hf, mg, dtype="bf16", log=_quiet)
    engine.megatron_to_hf(mg, str(tmp_path / "back"), log=_quiet)  # no dtype: the checkpoint's
    cfg = json.load(open(tmp_path / "back" / "config.json"))
    assert {t.dtype for t in _load(str(tmp_path / "back")).values()} == {torch.bfloat16}
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


@pytest.mark.parametrize("case,prefix", [("bloom", "transformer."), ("galactica", "model.")])
def test_checkpoints_saved_from_the_base_model(tmp_path, case, prefix):
    """Keys without the base-model prefix (what transformers itself loads) convert, and come
    back under the standard names with the same tensors."""
    from safetensors.torch import save_file

    hf = str(tmp_path / "hf")
    model = build_hf(CASES[case][0], hf)
    sd = _load(hf)
    bare = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
    assert any(k != b for k, b in zip(sorted(sd), sorted(bare)))
    for f in os.listdir(hf):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(hf, f))
    save_file(bare, os.path.join(hf, "model.safetensors"), metadata={"format": "pt"})
    mg = str(tmp_path / "mg")
    engine.hf_to_megatron(hf, mg, tp=2, log=_quiet)
    engine.megatron_to_hf(mg, str(tmp_path / "back"), log=_quiet)
    back = _load(str(tmp_path / "back"))
    ref = {k: v for k, v in model.state_dict().items() if k in back}
    assert ref and all(torch.equal(back[k], v) for k, v in ref.items())
    assert set(back) <= set(model.state_dict())
