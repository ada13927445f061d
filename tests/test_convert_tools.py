"""Conversion tools: reward models (score head and DeepSpeed-Chat v_head) both ways, the shell
scripts' argument handling, the Python aliases (megatron_to_hf.py, Megatron-LM-style convert.py) and
the HF-vs-Megatron comparison tool (a TP=2 run that passes, a damaged checkpoint that fails).
"""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TOOLS = os.path.join(ROOT, "toolkits", "model_checkpoints_convertor")

from tests.workers.convert_cases import CASES, _llama, build_hf  # noqa: E402


def _quiet(*a):
    pass


def _tensors(d):
    from safetensors.torch import load_file

    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for fn in sorted(set(idx.values())):
        out.update(load_file(os.path.join(d, fn)))
    return out


def _tool(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), os.path.join(TOOLS, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reward_model_score_head_roundtrip(tmp_path):
    import torch
    import transformers as T

    from megatron_patch.convert import engine

    cfg = T.LlamaConfig(**{k: v for k, v in _llama().items() if k != "architectures"}, num_labels=1,
                        pad_token_id=0)
    torch.manual_seed(0)
    m = T.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(tmp_path / "hf")
    meta = engine.hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "mg"), tp=2, pp=2, log=_quiet)
    assert meta["reward_model"] is True
    for tp in (0, 1):
        first = torch.load(tmp_path / "mg" / "release" / f"mp_rank_0{tp}_000" / "model_optim_rng.pt")
        last = torch.load(tmp_path / "mg" / "release" / f"mp_rank_0{tp}_001" / "model_optim_rng.pt")
        assert "rm_head.weight" not in first["model"]
        assert last["model"]["rm_head.weight"].shape == (1, 64)
        assert not any(k.startswith("output_layer") for k in list(first["model"]) + list(last["model"]))
    engine.megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), log=_quiet)
    back = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    ref = m.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref[k]), k
    ids = torch.randint(1, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)


def test_reward_model_v_head_deepspeed_chat(tmp_path):
    import torch
    from safetensors.torch import save_file

    from megatron_patch.convert import engine

    base = build_hf(_llama(), str(tmp_path / "base"))
    sd = {"rwtranformer." + k[len("model."):]: v.contiguous() for k, v in base.state_dict().items()
          if k.startswith("model.")}
    sd["v_head.weight"] = torch.randn(1, 64)
    src = tmp_path / "rm"
    os.makedirs(src)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(_llama()))
    meta = engine.hf_to_megatron(str(src), str(tmp_path / "mg"), tp=2, log=_quiet)
    assert meta["reward_model"] and meta["reward_head"] == "v_head.weight"
    engine.megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), log=_quiet)
    back = _tensors(str(tmp_path / "back"))
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_scripts_usage_and_errors(tmp_path):
    for script in ("model_convertor_huggingface_megatron.sh", "reward_model_convertor_megatron.sh",
                   "convert_transformers_megatron_bloom.sh"):
        path = os.path.join(TOOLS, script)
        r = subprocess.run(["bash", path, "-h"], capture_output=True, text=True)
        assert r.returncode == 2 and "usage" in r.stderr, (script, r.stderr)
        r = subprocess.run(["bash", path, "-", "a", "b"], capture_output=True, text=True)
        assert r.returncode == 2 and "usage" in r.stderr, script
    hf = tmp_path / "hf"
    build_hf(_llama(), str(hf))
    r = subprocess.run(["bash", os.path.join(TOOLS, "reward_model_convertor_megatron.sh"), "-",
                        str(hf), str(tmp_path / "mg"), "1", "1", "false"], capture_output=True,
                       text=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable))
    assert r.returncode == 1 and "not a reward model" in r.stderr, r.stderr
    assert not (tmp_path / "mg").exists()


def test_python_aliases(tmp_path):
    import torch

    hf = tmp_path / "hf"
    model = build_hf(_llama(num_key_value_heads=4), str(hf))
    conv = _tool("convert.py")
    assert conv.main(["--model-type", "GPT", "--loader", "llama2_hf", "--saver", "megatron",
                      "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                      "--load-dir", str(hf), "--save-dir", str(tmp_path / "mg")]) == 0
    meta = json.loads((tmp_path / "mg" / "megatron_patch.json").read_text())
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (2, 2)
    assert meta["family"] == "llama" and meta["format"] == "legacy"
    assert (tmp_path / "mg" / "config.json").exists()
    m2h = _tool("megatron_to_hf.py")
    assert m2h.main(["--load_path", str(tmp_path / "mg"), "--save_path", str(tmp_path / "bf16"),
                     "--target_params_dtype", "bf16", "--megatron_path", "-"]) == 0
    out = _tensors(str(tmp_path / "bf16"))
    ref = model.state_dict()
    for k, v in out.items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_convert_py_tokenizer_model(tmp_path, capsys):
    """--tokenizer-model lands in the target with the weights (copied before the target's atomic
    rename, so a failed conversion leaves neither); a mistyped path is an error before any work,
    not a checkpoint without its tokenizer; a folder stands for the tokenizer files in it."""
    from megatron_patch.convert import engine

    hf = tmp_path / "hf"
    build_hf(_llama(), str(hf))
    conv = _tool("convert.py")
    base = ["--loader", "llama2_hf", "--saver", "megatron", "--load-dir", str(hf)]
    assert conv.main(base + ["--save-dir", str(tmp_path / "a"), "--tokenizer-model",
                             str(tmp_path / "nope.model")]) == 1
    assert "nope.model does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    assert conv.main(base + ["--save-dir", str(tmp_path / "a"), "--tokenizer-model",
                             str(tmp_path / "empty")]) == 1
    assert "holds none of" in capsys.readouterr().err and not (tmp_path / "a").exists()
    spm = tmp_path / "tokenizer.model"
    spm.write_bytes(b"\x00sentencepiece-bytes")
    assert conv.main(base + ["--save-dir", str(tmp_path / "a"), "--tokenizer-model",
                             str(spm)]) == 0
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == spm.read_bytes()
    tokdir = tmp_path / "tok"
    tokdir.mkdir()
    (tokdir / "tokenizer.json").write_text("{}")
    (tokdir / "unrelated.txt").write_text("x")
    assert conv.main(["--loader", "megatron", "--saver", "hf", "--load-dir", str(tmp_path / "a"),
                      "--save-dir", str(tmp_path / "b"), "--tokenizer-model", str(tokdir)]) == 0
    assert (tmp_path / "b" / "tokenizer.json").read_text() == "{}"
    assert not (tmp_path / "b" / "unrelated.txt").exists()
    # the copy happens inside the staging folder: a copy that fails leaves no target behind
    real = engine.shutil.copy2

    def broken(src, dst, *a, **k):
        if os.path.basename(src) == "tokenizer.model" and ".partial-" in dst:
            raise OSError("disk full")
        return real(src, dst, *a, **k)

    engine.shutil.copy2 = broken
    try:
        try:
            conv.main(base + ["--save-dir", str(tmp_path / "c"), "--tokenizer-model", str(spm)])
        except OSError:
            pass
        else:
            raise AssertionError("the failed copy was not raised")
    finally:
        engine.shutil.copy2 = real
    assert not (tmp_path / "c").exists()
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_compare_tool(tmp_path):
    import torch

    from megatron_patch.convert import engine

    hf = tmp_path / "hf"
    build_hf(_llama(), str(hf))
    engine.hf_to_megatron(str(hf), str(tmp_path / "mg"), tp=2, log=_quiet)
    script = os.path.join(TOOLS, "compare_hf_megatron.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, script, "--hf-dir", str(hf), "--megatron-dir",
                        str(tmp_path / "mg"), "--json"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["max_abs_diff"] < 1e-4 and res["top1_agreement"] == 1.0 and res["world_size"] == 2
    # a damaged checkpoint: swap two layers' MLPs on one TP rank -> large difference, exit 1
    engine.hf_to_megatron(str(hf), str(tmp_path / "bad"), log=_quiet)
    p = tmp_path / "bad" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    obj = torch.load(p)
    sd = obj["model"]
    a, b = "decoder.layers.0.mlp.linear_fc2.weight", "decoder.layers.1.mlp.linear_fc2.weight"
    sd[a], sd[b] = sd[b], sd[a]
    torch.save(obj, p)
    r = subprocess.run([sys.executable, script, "--hf-dir", str(hf), "--megatron-dir",
                        str(tmp_path / "bad")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stdout + r.stderr


def test_compare_tool_bloom_has_eager_attention_only(tmp_path):
    """transformers' Bloom offers no SDPA attention: the tool falls back to its eager one."""
    from megatron_patch.convert import engine

    hf = tmp_path / "hf"
    build_hf(CASES["bloom"][0], str(hf))
    engine.hf_to_megatron(str(hf), str(tmp_path / "mg"), log=_quiet)
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "compare_hf_megatron.py"), "--hf-dir",
                        str(hf), "--megatron-dir", str(tmp_path / "mg"), "--json"],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["family"] == "bloom" and res["max_abs_diff"] < 1e-4 and res["top1_agreement"] == 1.0
