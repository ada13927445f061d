"""GPU path of the generation CLI (skipped without a CUDA GPU): the llama script on a converted tiny
LLaMA with an in-process byte-level BPE tokenizer stored in the checkpoint; greedy completions at fp32
equal ``transformers`` (on the CPU) and bf16 keeps the line layout."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

pytestmark = pytest.mark.gpu

PROMPTS = ["the quick brown", "", "hello world", "once upon a time there"]
NEW = 12


def _escape(s):
    return s.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


def test_cli_script_on_gpu(tmp_path):
    import torch
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.workers.convert_cases import _llama, build_hf

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog " * 3,
              "hello world, megatron generates text", "once upon a time there was a model"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_dir, mg_dir = str(tmp_path / "hf"), str(tmp_path / "mg")
    build_hf(_llama(vocab_size=tok.get_vocab_size(), eos_token_id=0, bos_token_id=None), hf_dir)
    tok.save(os.path.join(hf_dir, "tokenizer.json"))
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<eos>"}, f)
    import megatron_patch  # noqa: F401
    from megatron_patch.convert.engine import hf_to_megatron

    hf_to_megatron(hf_dir, mg_dir, log=lambda *a: None)
    inp = tmp_path / "in.txt"
    inp.write_text("\n".join(PROMPTS) + "\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("MEGATRON_PATCH_DEVICE", None)
    outs = {}
    for prec in ("fp32", "bf16"):
        env["EXTRA_ARGS"] = f"--precision {prec}"
        out = tmp_path / f"out_{prec}.txt"
        r = subprocess.run(["bash", os.path.join(ROOT, "examples", "llama",
                                                 "run_text_generation_megatron_llama.sh"),
                            "dsw", "-", "-", "-", mg_dir, "auto", "1", "2", "64", "1", "0", str(NEW),
                            str(inp), str(out), "0", "1.0", "1.0"],
                           capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        outs[prec] = out.read_text().split("\n")[:-1]
    hf = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ref = []
    for p in PROMPTS:
        if not p:
            ref.append("")
            continue
        ids = tok.encode(p).ids
        with torch.no_grad():
            gen = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW,
                              eos_token_id=0, pad_token_id=0)[0, len(ids):].tolist()
        ref.append(_escape(tok.decode(gen[: gen.index(0)] if 0 in gen else gen)))
    assert outs["fp32"] == ref
    assert len(outs["bf16"]) == len(PROMPTS) and outs["bf16"][1] == ""
