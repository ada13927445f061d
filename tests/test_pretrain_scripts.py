"""Every family's continued-pretraining launch script, end to end on CPU at tiny size.

The corpus is chatterbot's English dialogs, tokenised with a byte-level BPE trained here and turned
into a megatron-core ``.bin/.idx`` dataset by our preprocessing. Each family's
``run_pretrain_megatron_<family>.sh`` trains its tiny model from scratch for 4 iterations (global
batch 4 x 32 tokens, TRAIN_TOKENS 512): one finite ``lm_loss`` per iteration that falls, a checkpoint
at iteration 4 named after the run, tagged with the family. Mixtral runs with expert parallelism
(``EP=2``: two CPU processes, two experts each); its checkpoint then fine-tunes at EP=2 through
``run_finetune_megatron_mixtral.sh`` and generates through ``run_text_generation_megatron_mixtral.sh``
(experts regathered: generation runs at EP=1) identically with one process and with two.
"""
import json
import math
import os

import pytest

from data_fixtures import chatterbot_dialogs, train_bpe_folder
from script_helpers import clean_env as _env, ok as _ok, only as _only, run as _run, \
    script as _script

FAMILIES = ["llama", "bloom", "falcon", "glm", "galactica", "qwen2", "mistral", "mixtral"]


def _pretrain_args(data, out):
    # MODEL_SIZE BATCH GBS LR MIN_LR SEQ EXTRA_VOCAB PR TP PP AC DO FL SP SAVE_INTERVAL DATA
    # PRETRAIN_CHECKPOINT TRAIN_TOKENS WARMUP_TOKENS OUTPUT
    return ["dsw", "-", "-", "tiny", "2", "4", "1e-3", "1e-4", "32", "0", "fp32", "1", "1", "none",
            "false", "false", "false", "2", data, "none", "512", "128", str(out)]


def test_usage_and_wrong_count_exit_2():
    for fam in FAMILIES:
        r = _run([_script("pretrain", fam), "-h"])
        assert r.returncode == 2 and "usage:" in r.stdout and "TRAIN_TOKENS" in r.stdout, \
            (fam, r.stdout + r.stderr)
        assert "| tiny |" in r.stdout and "EP (expert parallel size" in r.stdout, r.stdout
        r = _run([_script("pretrain", fam), "dsw", "-", "-"])
        assert r.returncode == 2 and "expected 23 arguments, got 3" in r.stderr, r.stderr


def test_bad_settings_exit_2_before_launch(tmp_path):
    base = _pretrain_args("data", tmp_path / "o")
    for i, bad, msg in ((10, "fp8", "PR must be fp32, fp16 or bf16"),
                        (11, "two", "TP must be a positive number"),
                        (15, "maybe", "FL must be true or false")):
        argv = list(base)
        argv[i] = bad
        r = _run([_script("pretrain", "falcon"), *argv])
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = _run([_script("pretrain", "mixtral"), *base], env=_env(EP="0"))
    assert r.returncode == 2 and "EP must be a positive number, got '0'" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "o")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_patch.data._preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("ptdata")
    pairs = chatterbot_dialogs("english")
    texts = [q + " " + a for q, a in pairs]
    tok = {fam: train_bpe_folder(str(root / f"tok_{fam}"), texts, family=fam)
           for fam in ("bloom", "glm")}
    jsonl = root / "corpus.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    prefixes = {}
    for fam, path in tok.items():
        prefix = str(root / f"chatterbot_{fam}")
        summary = preprocess(PreprocessConfig(input=str(jsonl), output_prefix=prefix,
                                              append_eod=True, tokenizer_model=path))
        assert summary["ok"] and summary["documents"] == len(texts)
        prefixes[fam] = prefix + "_text_document"
    sft = root / "sft.jsonl"
    with open(sft, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"query": q, "response": a}) + "\n" for q, a in pairs[:16])
    return {"root": root, "tok": tok, "data": prefixes, "sft": str(sft), "pairs": pairs}


def _pretrain(corpus, family, **env):
    kind = "glm" if family == "glm" else "bloom"
    out = corpus["root"] / f"out_{family}"
    r = _run([_script("pretrain", family), *_pretrain_args(corpus["data"][kind], out)],
             env=_env(TOKENIZER_PATH=corpus["tok"][kind], **env), cwd=str(corpus["root"]))
    return out, _ok(r)


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrain_script_trains_from_scratch(corpus, family):
    env = {"EP": 2} if family == "mixtral" else {}
    out, log = _pretrain(corpus, family, **env)
    ckpt, log_dir = _only(out / "checkpoint"), _only(out / "log")
    name = (f"pretrain-megatron-{family}-tiny-lr-1e-3-minlr-1e-4-bs-2-gbs-4-seqlen-32-pr-fp32-"
            "tp-1-pp-1-ac-none-do-false-sp-false")
    assert os.path.basename(ckpt) == (name + "-expp-2" if family == "mixtral" else name)
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if "lm_loss" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4], train
    loss = [r["lm_loss"] for r in train]
    assert all(math.isfinite(x) for x in loss) and loss[-1] < loss[0], loss
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "4"
    meta = json.load(open(os.path.join(ckpt, "megatron_patch.json")))
    assert meta["family"] == family
    assert f"> {family} model:" in log and "--model-family " + family in log
    if family == "mixtral":
        assert "DP=2 EP=2" in log and meta["expert_model_parallel_size"] == 2
        assert sorted(os.listdir(os.path.join(ckpt, "iter_0000004"))) == \
            ["mp_rank_00_000", "mp_rank_00_001"]


def test_mixtral_finetune_and_generate_from_ep2_checkpoint(corpus, tmp_path):
    base = corpus["root"] / "out_mixtral" / "checkpoint"
    if not os.path.isdir(base):
        _pretrain(corpus, "mixtral", EP=2)
    ckpt = _only(base)
    # SFT at EP=2 from the EP=2 checkpoint (each rank loads its own experts' file)
    out = tmp_path / "sft"
    argv = ["dsw", "-", "-", "tiny", "2", "1e-3", "1e-4", "96", "96", "0", "fp32", "1", "1",
            "none", "false", "false", "false", corpus["sft"], "none", ckpt, "1", str(out)]
    log = _ok(_run([_script("finetune", "mixtral"), *argv], env=_env(EP=2), cwd=str(tmp_path)))
    assert "EP=2" in log and "> initialised weights from " + ckpt in log
    assert "resharding" not in log
    sft = _only(out / "checkpoint")
    with open(os.path.join(_only(out / "log"), "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if "lm_loss" in r]
    assert len(train) == 4 and all(math.isfinite(r["lm_loss"]) for r in train)  # 16 / (2 x 2)
    # greedy generation from the EP=2 SFT checkpoint, its experts regathered (generation runs at
    # EP=1): one process and two data-parallel replicas write the same completions
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(q for q, _ in corpus["pairs"][:4]) + "\n")
    outs = {}
    for nproc in (1, 2):
        dst = tmp_path / f"gen{nproc}.txt"
        gen = ["dsw", "-", "-", "-", sft, "auto", "1", "2", "64", "1", "24", "8", str(prompts),
               str(dst), "0", "1.0", "1.0"]
        log = _ok(_run([_script("text_generation", "mixtral"), *gen],
                       env=_env(NPROC_PER_NODE=nproc), cwd=str(tmp_path)))
        assert "resharding" in log, log[-3000:]
        outs[nproc] = dst.read_text()
    assert outs[1] == outs[2] and len(outs[1].split("\n")) == 5, outs
