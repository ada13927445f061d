"""Conversion engine checks: parity with transformers at TP=1/TP=2/PP=2 (EP=2 for MoE), bit-exact
round trips and resharding (one 2-process launch for all families), plus single-process checks of the
error paths (bad layouts, missing/truncated shards, unknown architectures, left-over keys) and of the
input formats (.bin, sharded safetensors, extra vocabulary, training checkpoints).
"""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workers.convert_cases import CASES, VOCAB, _llama, build_hf  # noqa: E402


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    from megatron_patch.launch import launch_local

    work = tmp_path_factory.mktemp("parity")
    out = work / "results.json"
    launch_local([os.path.join(ROOT, "tests", "workers", "convert_parity.py"), str(work), str(out)],
                 2, cwd=ROOT, timeout=600)
    res = json.loads(out.read_text())
    res["__work__"] = str(work)
    return res


def _checks():
    out = []
    for name, (_, opts) in CASES.items():
        for check in ("tp1", "tp2", "pp2", "roundtrip_tp2", "roundtrip_pp2", "reshard_tp2_pp2"):
            out.append((name, check))
        if opts.get("ep"):
            out += [(name, "ep2")]
    return out


@pytest.mark.parametrize("case,check", _checks())
def test_parity(parity, case, check):
    r = parity[case]
    assert "build" not in r, r["build"]
    assert r.get(check) == "ok", r.get(check, f"check {check} did not run: {sorted(r)}")


@pytest.fixture(scope="module")
def parity4(tmp_path_factory):
    from megatron_patch.launch import launch_local

    work = tmp_path_factory.mktemp("parity4")
    out = work / "results.json"
    launch_local([os.path.join(ROOT, "tests", "workers", "convert_parity.py"), str(work), str(out)],
                 4, cwd=ROOT, timeout=900, env={"CONVERT_LAYOUTS": "tp2pp2,tp2ep2"})
    return json.loads(out.read_text())


def _checks4():
    out = []
    for name, (_, opts) in CASES.items():
        out += [(name, "tp2pp2"), (name, "roundtrip_tp2pp2")]
        if opts.get("ep"):
            out += [(name, "tp2ep2"), (name, "roundtrip_tp2ep2")]
    return out


@pytest.mark.parametrize("case,check", _checks4())
def test_parity_tp2_pp2(parity4, case, check):
    """TP=2 x PP=2 (4 processes) for every family; Mixtral also at EP=2 x TP=2 (sequence parallel)."""
    r = parity4[case]
    assert "build" not in r, r["build"]
    assert r.get(check) == "ok", r.get(check, f"check {check} did not run: {sorted(r)}")


def test_torch_dist_checkpoint_to_hf_and_reshard(parity, tmp_path):
    """A torch_dist checkpoint saved by megatron-core at TP=2 (iteration 7) converts to HF bit-exactly
    and reshards to a legacy PP=2 checkpoint equal to the direct conversion."""
    import torch

    from tests.workers.convert_parity import compare_dirs

    work = os.path.join(parity["__work__"], "llama")
    assert parity["llama"].get("tp2") == "ok", parity["llama"].get("tp2")
    src = os.path.join(work, "tp2_torch_dist")
    assert os.path.isfile(os.path.join(src, "iter_0000007", "metadata.json"))
    notes = []
    _engine().megatron_to_hf(src, str(tmp_path / "hf"), log=notes.append)
    assert any("torch_dist" in n for n in notes)
    compare_dirs(os.path.join(work, "hf"), str(tmp_path / "hf"))
    _engine().reshard(src, str(tmp_path / "pp2"), tp=1, pp=2, log=_quiet)
    for stage in ("mp_rank_00_000", "mp_rank_00_001"):
        a = torch.load(tmp_path / "pp2" / "release" / stage / "model_optim_rng.pt")["model"]
        b = torch.load(os.path.join(work, "pp2", "release", stage, "model_optim_rng.pt"))["model"]
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert sorted(os.listdir(tmp_path)) == ["hf", "pp2"]  # no temporary copies left


# ------------------------------------------------------------------ single-process error paths

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "llama"
    build_hf(_llama(), str(d))
    return str(d)


def _engine():
    from megatron_patch.convert import engine

    return engine


def _quiet(*a):
    pass


def test_tp_not_dividing_heads_fails_before_writing(tiny_hf, tmp_path):
    from megatron_patch.convert.rules import ConversionError

    target = tmp_path / "mg"
    with pytest.raises(ConversionError, match="does not divide|do not divide"):
        _engine().hf_to_megatron(tiny_hf, str(target), tp=3, log=_quiet)
    assert not target.exists() and os.listdir(tmp_path) == []


def test_unknown_architecture(tiny_hf, tmp_path):
    import shutil

    from megatron_patch.convert.rules import ConversionError

    src = tmp_path / "odd"
    shutil.copytree(tiny_hf, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["FooForCausalLM"], "foo"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="FooForCausalLM"):
        _engine().hf_to_megatron(str(src), str(tmp_path / "mg"), log=_quiet)
    assert not (tmp_path / "mg").exists()


def test_missing_shard_and_truncated_file(tmp_path):
    from megatron_patch.convert.rules import ConversionError

    src = tmp_path / "sharded"
    model = build_hf(_llama(), str(src))
    model.save_pretrained(str(src), max_shard_size="40KB")
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2
    if (src / "model.safetensors").exists():
        os.unlink(src / "model.safetensors")
    # the sharded checkpoint converts
    _engine().hf_to_megatron(str(src), str(tmp_path / "ok"), tp=2, log=_quiet)
    # a truncated shard fails, naming the file, and leaves no target
    with open(src / shards[1], "r+b") as f:
        f.truncate(os.path.getsize(src / shards[1]) // 2)
    with pytest.raises(ConversionError, match=shards[1]):
        _engine().hf_to_megatron(str(src), str(tmp_path / "bad1"), log=_quiet)
    # a missing shard fails, naming it
    os.unlink(src / shards[1])
    with pytest.raises(ConversionError, match=shards[1]):
        _engine().hf_to_megatron(str(src), str(tmp_path / "bad2"), log=_quiet)
    left = sorted(os.listdir(tmp_path))
    assert left == ["ok", "sharded"], left


def test_leftover_key_is_named(tiny_hf, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from megatron_patch.convert.rules import ConversionError

    src = tmp_path / "extra"
    shutil.copytree(tiny_hf, src)
    st = src / "model.safetensors"
    sd = load_file(str(st))
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(sd, str(st), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="mystery"):
        _engine().hf_to_megatron(str(src), str(tmp_path / "mg"), log=_quiet)
    del sd["model.layers.0.self_attn.mystery.weight"]
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(st), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        _engine().hf_to_megatron(str(src), str(tmp_path / "mg"), log=_quiet)
    assert not (tmp_path / "mg").exists()


def test_bin_input_extra_vocab_and_nonempty_target(tmp_path):
    import torch
    from safetensors.torch import load_file

    from megatron_patch.convert.rules import ConversionError

    src = tmp_path / "bin"
    model = build_hf(_llama(), str(src))
    for f in os.listdir(src):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.unlink(src / f)
    torch.save(model.state_dict(), src / "pytorch_model.bin")  # transformers 5 writes no .bin
    e = _engine()
    meta = e.hf_to_megatron(str(src), str(tmp_path / "mg"), tp=2, extra_vocab_size=7, log=_quiet)
    assert meta["original_vocab_size"] == VOCAB + 7 and meta["padded_vocab_size"] == 256
    with pytest.raises(ConversionError, match="not empty"):
        e.hf_to_megatron(str(src), str(tmp_path / "mg"), log=_quiet)
    e.megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), log=_quiet)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg["vocab_size"] == VOCAB + 7
    idx = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    out = {}
    for fn in set(idx["weight_map"].values()):
        out.update(load_file(str(tmp_path / "back" / fn)))
    ref = model.state_dict()
    emb = out["model.embed_tokens.weight"]
    assert emb.shape[0] == VOCAB + 7
    assert torch.equal(emb[:VOCAB], ref["model.embed_tokens.weight"])
    assert torch.count_nonzero(emb[VOCAB:]) == 0
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], ref["model.layers.1.mlp.up_proj.weight"])


def test_training_checkpoint_reshard_drops_optimizer(tiny_hf, tmp_path):
    import shutil

    import torch

    e = _engine()
    e.hf_to_megatron(tiny_hf, str(tmp_path / "mg"), tp=2, log=_quiet)
    # make it look like a checkpoint written by training at iteration 100
    train = tmp_path / "train"
    shutil.copytree(tmp_path / "mg", train)
    os.rename(train / "release", train / "iter_0000100")
    (train / "latest_checkpointed_iteration.txt").write_text("100")
    for r in ("mp_rank_00", "mp_rank_01"):
        p = train / "iter_0000100" / r / "model_optim_rng.pt"
        obj = torch.load(p)
        obj.update(iteration=100, optimizer={"state": {0: {"exp_avg": torch.zeros(3)}}},
                   opt_param_scheduler={"num_steps": 100}, rng_state=[{"random_rng_state": (1, 2)}])
        torch.save(obj, p)
    notes = []
    e.reshard(str(train), str(tmp_path / "pp2"), tp=1, pp=2, log=notes.append)
    assert any("optimizer" in n and "dropped" in n for n in notes), notes
    e.hf_to_megatron(tiny_hf, str(tmp_path / "direct"), pp=2, log=_quiet)
    for stage in ("mp_rank_00_000", "mp_rank_00_001"):
        a = torch.load(tmp_path / "pp2" / "release" / stage / "model_optim_rng.pt")
        b = torch.load(tmp_path / "direct" / "release" / stage / "model_optim_rng.pt")
        assert set(a) == {"model", "iteration", "checkpoint_version"}
        assert sorted(a["model"]) == sorted(b["model"])
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
    meta = json.loads((tmp_path / "pp2" / "megatron_patch.json").read_text())
    assert meta["pipeline_model_parallel_size"] == 2 and meta["source_iteration"] == 100


def test_virtual_pipeline_training_checkpoint_converts(tmp_path):
    """A PP=2 x VPP=2 training checkpoint (model0/model1 chunks per rank) converts back exactly."""
    import torch

    from tests.workers.convert_parity import compare_dirs

    hf = tmp_path / "hf"
    build_hf(_llama(num_hidden_layers=4), str(hf))
    e = _engine()
    e.hf_to_megatron(str(hf), str(tmp_path / "pp4"), pp=4, log=_quiet)
    vpp = tmp_path / "vpp"
    os.makedirs(vpp / "iter_0000003")
    for p in range(2):  # PP rank p holds virtual stages p and 2 + p
        chunks = [torch.load(tmp_path / "pp4" / "release" / f"mp_rank_00_{s:03d}" /
                             "model_optim_rng.pt")["model"] for s in (p, 2 + p)]
        os.makedirs(vpp / "iter_0000003" / f"mp_rank_00_{p:03d}")
        torch.save({"model0": chunks[0], "model1": chunks[1], "iteration": 3},
                   vpp / "iter_0000003" / f"mp_rank_00_{p:03d}" / "model_optim_rng.pt")
    (vpp / "latest_checkpointed_iteration.txt").write_text("3")
    (vpp / "config.json").write_text((hf / "config.json").read_text())
    meta = json.loads((tmp_path / "pp4" / "megatron_patch.json").read_text())
    meta.pop("hf_config")
    meta.update(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    (vpp / "megatron_patch.json").write_text(json.dumps(meta))
    e.megatron_to_hf(str(vpp), str(tmp_path / "back"), log=_quiet)
    compare_dirs(str(hf), str(tmp_path / "back"))
