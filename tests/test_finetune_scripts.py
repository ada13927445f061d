"""The fine-tuning launch scripts end to end on CPU at tiny size, on real dialogs (chatterbot English
pairs) with the real LLaMA sentencepiece tokenizer:

- usage / exit 2 on ``-h`` and on a wrong argument count for every new script (7 families x
  finetune + evaluate, 4 tutorials); a missing tutorial variable or a bad setting is one ``error:``
  line with exit 2, before anything starts; a training error's exit code survives ``| tee``;
- ``run_finetune_megatron_llama.sh`` trains the tiny LLaMA from scratch for one epoch over 64 SFT
  records (8 iterations of 2 microbatches): one metrics record with an ``lm_loss`` per iteration,
  the validation after the epoch, the checkpoint tracker; the identical command again resumes and
  runs nothing; ``run_evaluate_megatron_llama.sh`` on that checkpoint prints loss and perplexity
  equal to the run's own final validation; one TP=2 run (2 processes, sequence parallel,
  distributed optimizer);
- the llama2 tutorial pair: SFT from that checkpoint, then the reward model from the SFT checkpoint
  (new value head, ``reward_model: true``) under ``OUTPUT_DIR/step1_sft`` and ``step2_reward``; the
  evaluate script with ``TASK=reward`` reproduces the reward run's own validation;
- ``bloom_sft.sh`` from scratch with a byte-level BPE trained here (``VOCAB_FILE`` alias).
"""
import json
import math
import os
import random

import pytest

from data_fixtures import chatterbot_dialogs, llama_model, train_bpe_folder
from script_helpers import ROOT, clean_env as _env, ok as _ok, only as _only, run as _run, \
    script as _script

FAMILIES = ["llama", "bloom", "falcon", "glm", "galactica", "qwen2", "mistral", "mixtral"]
TUTORIALS = {"step1_sft/llama2_sft.sh": ["MODEL_SIZE", "LOAD_PATH", "TOKENIZER_MODEL",
                                         "DATASET_PATH"],
             "step2_reward/llama2_reward.sh": ["LOAD_PATH", "TOKENIZER_MODEL", "DATASET_PATH"],
             "step1_sft/bloom_sft.sh": ["TOKENIZER_PATH", "MODEL_SIZE", "LOAD_PATH",
                                        "DATASET_PATH"],
             "step2_reward/bloom_reward.sh": ["TOKENIZER_PATH", "LOAD_PATH", "DATASET_PATH"]}


def _tutorial(name):
    return os.path.join(ROOT, "examples", "rlhf", name)


def _finetune_args(size, bs, seq, pr, tp, train, valid, ckpt, epochs, out, ac="none", do="false",
                   sp="false"):
    return ["dsw", "-", "-", size, str(bs), "1e-3", "1e-4", str(seq), str(seq), "0", pr, str(tp),
            "1", ac, do, "false", sp, str(train), str(valid), str(ckpt), str(epochs), str(out)]


def _metrics(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------ cheap checks


def test_usage_and_wrong_count_exit_2():
    for fam in FAMILIES:
        for kind, n in (("finetune", 22), ("evaluate", 14)):
            r = _run([_script(kind, fam), "-h"])
            assert r.returncode == 2 and "usage:" in r.stdout and "OUTPUT_BASEPATH" in r.stdout, \
                (fam, kind, r.stdout + r.stderr)
            r = _run([_script(kind, fam), "dsw", "-", "-"])
            assert r.returncode == 2 and f"expected {n} arguments, got 3" in r.stderr, r.stderr
    for name, required in TUTORIALS.items():
        r = _run([_tutorial(name), "-h"])
        assert r.returncode == 2 and "usage:" in r.stdout, r.stdout + r.stderr
        assert all(v in r.stdout for v in required) and "OUTPUT_DIR" in r.stdout
        r = _run([_tutorial(name), "extra"])
        assert r.returncode == 2 and "expected 0 arguments, got 1" in r.stderr, r.stderr


def test_tutorial_missing_variable_is_one_line_exit_2(tmp_path):
    for name, required in TUTORIALS.items():
        for missing in required:
            env = _env(**{v: "x" for v in required if v != missing})
            r = _run([_tutorial(name)], env=env, cwd=str(tmp_path))
            assert r.returncode == 2, (name, missing, r.stdout + r.stderr)
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and missing in errors[0], (name, missing, r.stderr)
    assert not os.listdir(tmp_path)  # nothing was started or written


def test_bad_settings_exit_2_before_launch(tmp_path):
    base = _finetune_args("tiny", 1, 32, "fp32", 1, "t.jsonl", "none", "none", 1, tmp_path / "o")
    for i, bad, msg in ((10, "fp8", "PR must be fp32, fp16 or bf16"),
                        (13, "some", "AC must be sel, full or none"),
                        (14, "yes", "DO must be true or false")):
        argv = list(base)
        argv[i] = bad
        r = _run([_script("finetune", "qwen2"), *argv])
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    r = _run([_script("finetune", "qwen2"), *base], env=_env(TASK="dpo"))
    assert r.returncode == 2 and "TASK must be sft or reward" in r.stderr
    r = _run([_script("evaluate", "mistral"), "dsw", "-", "-", "auto", "1", "32", "32", "0",
              "fp32", "1", "1", "d.jsonl", "ck", str(tmp_path / "o")], env=_env(TASK="x"))
    assert r.returncode == 2 and "TASK must be sft or reward" in r.stderr
    assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """64 SFT records, 16 validation records and 32 reward pairs from chatterbot's English dialogs."""
    pairs = chatterbot_dialogs("english")
    rng = random.Random(0)
    picked = rng.sample(pairs, 80)
    root = tmp_path_factory.mktemp("ftdata")

    def write(name, rows):
        with open(root / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return str(root / name)

    answers = [a for _, a in pairs]
    reward = []
    for q, a in picked[:32]:
        other = rng.choice(answers)
        while other == a:
            other = rng.choice(answers)
        reward.append({"prompt": q, "chosen": a, "rejected": other})
    return {"train": write("sft_train.jsonl", [{"query": q, "response": a} for q, a in picked[:64]]),
            "valid": write("sft_valid.jsonl", [{"query": q, "response": a} for q, a in picked[64:]]),
            "reward": write("reward_pairs.jsonl", reward),
            "texts": [q + " " + a for q, a in pairs],
            "root": root}


@pytest.fixture(scope="module")
def llama_run(data, tmp_path_factory):
    """The llama finetune script: tiny LLaMA from scratch, 1 epoch over 64 records, micro batch 4,
    global batch 8 (2 microbatches) -> 8 iterations; validation on 16 records after the epoch."""
    out = tmp_path_factory.mktemp("ft") / "out"
    argv = [_script("finetune", "llama"),
            *_finetune_args("tiny", 4, 64, "fp32", 1, data["train"], data["valid"], "none", 1, out)]
    env = _env(TOKENIZER_PATH=llama_model(), GLOBAL_BATCH_SIZE=8)
    r = _run(argv, env=env, cwd=str(data["root"]))
    log = _ok(r)
    return {"argv": argv, "env": env, "out": out, "log": log,
            "ckpt": _only(out / "checkpoint"), "log_dir": _only(out / "log")}


# ------------------------------------------------------------------------------------ end to end


def test_finetune_script_trains_one_epoch(llama_run):
    ckpt, log_dir = llama_run["ckpt"], llama_run["log_dir"]
    name = os.path.basename(ckpt)
    assert name == ("sft-megatron-llama-tiny-lr-1e-3-minlr-1e-4-bs-4-gbs-8-seqlen-64-padlen-64-"
                    "pr-fp32-tp-1-pp-1-ac-none-do-false-sp-false-ep-1")
    assert os.path.basename(log_dir) == name
    assert os.listdir(llama_run["out"] / "tensorboard" / name)
    recs = _metrics(log_dir)
    train = [r for r in recs if "lm_loss" in r]
    assert [r["iteration"] for r in train] == list(range(1, 9))
    # every sample keeps response tokens at SEQ_LEN 64 (Alpaca prompts are 35-60 LLaMA tokens here)
    assert all(math.isfinite(r["lm_loss"]) and r["lm_loss"] > 1.0 for r in train)
    assert [r["consumed_samples"] for r in train] == [8 * i for i in range(1, 9)]
    valid = [r for r in recs if "valid_lm_loss" in r]
    assert [r["iteration"] for r in valid] == [8]  # once per epoch
    assert open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "8"
    meta = json.load(open(os.path.join(ckpt, "megatron_patch.json")))
    assert meta["family"] == "llama" and meta["reward_model"] is False
    assert os.path.isfile(os.path.join(ckpt, "tokenizer.model"))
    console = open(os.path.join(log_dir, "console.log")).read()
    assert "iteration        8/       8" in console and "64 training samples" in console
    assert f"> checkpoint: {llama_run['out']}/checkpoint/{name}" in llama_run["log"]


def test_rerun_resumes_without_new_iterations(llama_run):
    before = _metrics(llama_run["log_dir"])
    log = _ok(_run(llama_run["argv"], env=llama_run["env"]))
    assert "resumed from" in log and "at iteration 8" in log
    assert "iteration        1/" not in log and "saved checkpoint" not in log
    assert _metrics(llama_run["log_dir"]) == before
    assert os.listdir(llama_run["ckpt"]).count("iter_0000008") == 1


def test_evaluate_script_reports_loss_and_ppl(llama_run, data, tmp_path):
    out = tmp_path / "eval"
    log = _ok(_run([_script("evaluate", "llama"), "dsw", "-", "-", "auto", "4", "64", "64", "0",
                    "fp32", "1", "1", data["valid"], llama_run["ckpt"], str(out)]))
    line = [ln for ln in log.splitlines() if ln.startswith("> evaluation of")]
    assert len(line) == 1 and "lm loss:" in line[0] and "ppl:" in line[0], log[-3000:]
    result = json.load(open(_only(_only(out / "log")) + "/evaluation.json"))
    assert result["samples"] == 16
    assert result["ppl"] == pytest.approx(math.exp(result["lm loss"]), rel=1e-9)
    # the same weights on the same 16 records: the run's own validation after its last iteration
    valid = [r for r in _metrics(llama_run["log_dir"]) if "valid_lm_loss" in r][-1]
    assert result["lm loss"] == pytest.approx(valid["valid_lm_loss"], rel=1e-5)


def test_finetune_script_tp2(data, tmp_path):
    """Two CPU processes at TP=2 with sequence parallel and the distributed optimizer."""
    out = tmp_path / "out"
    log = _ok(_run([_script("finetune", "llama"),
                    *_finetune_args("tiny", 4, 64, "fp32", 2, data["valid"], "none", "none", 1, out,
                                    ac="sel", do="true", sp="true")],
                   env=_env(TOKENIZER_PATH=llama_model())))
    assert "--nproc-per-node 2" in log and "TP=2 PP=1 DP=1" in log
    ckpt = _only(out / "checkpoint")
    assert ckpt.endswith("-bs-4-gbs-4-seqlen-64-padlen-64-pr-fp32-tp-2-pp-1-ac-sel-do-true-sp-true-ep-1")
    train = [r for r in _metrics(_only(out / "log")) if "lm_loss" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert all(r["lm_loss"] > 1.0 for r in train)
    assert sorted(os.listdir(os.path.join(ckpt, "iter_0000004"))) == ["mp_rank_00", "mp_rank_01"]


def test_error_exit_code_survives_tee(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    r = _run([_script("finetune", "falcon"),
              *_finetune_args("tiny", 1, 32, "fp32", 1, missing, "none", "none", 1, tmp_path / "o")],
             env=_env(TOKENIZER_PATH=llama_model()))
    assert r.returncode != 0
    errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "nope.jsonl" in errors[0], r.stdout[-2000:] + r.stderr[-2000:]


def test_llama2_tutorial_sft_then_reward(llama_run, data, tmp_path):
    tok = llama_model()
    common = dict(OUTPUT_DIR=tmp_path / "runs", TOKENIZER_MODEL=tok, SEQ_LEN=64, EPOCHS=1, AC="none",
                  DO="false", FL="false")
    # step 1 from the finetune script's checkpoint (MODEL_SIZE auto: its config.json)
    log = _ok(_run([_tutorial("step1_sft/llama2_sft.sh")], cwd=str(tmp_path),
                   env=_env(MODEL_SIZE="auto", LOAD_PATH=llama_run["ckpt"],
                            DATASET_PATH=data["train"], BATCH_SIZE=8, **common)))
    assert "llama2_sft.sh: sft of a llama model; settings:" in log and "  PR=fp32" in log
    assert "initialised weights from" in log
    sft_ckpt = _only(tmp_path / "runs" / "step1_sft" / "checkpoint")
    assert os.path.basename(sft_ckpt).startswith("sft-megatron-llama-auto-lr-1e-5-")
    train = [r for r in _metrics(_only(tmp_path / "runs" / "step1_sft" / "log")) if "lm_loss" in r]
    assert [r["iteration"] for r in train] == list(range(1, 9))
    assert all(r["lm_loss"] > 1.0 for r in train)

    # step 2: the reward model from the SFT checkpoint
    log = _ok(_run([_tutorial("step2_reward/llama2_reward.sh")], cwd=str(tmp_path),
                   env=_env(LOAD_PATH=sft_ckpt, DATASET_PATH=data["reward"],
                            VALID_DATASET_PATH=data["reward"], BATCH_SIZE=4, **common)))
    assert "new value head" in log and "MODEL_SIZE=auto" in log
    rm_ckpt = _only(tmp_path / "runs" / "step2_reward" / "checkpoint")
    assert os.path.basename(rm_ckpt).startswith("reward-megatron-llama-auto-lr-5e-6-")
    meta = json.load(open(os.path.join(rm_ckpt, "megatron_patch.json")))
    assert meta["reward_model"] is True
    recs = _metrics(_only(tmp_path / "runs" / "step2_reward" / "log"))
    assert [r["iteration"] for r in recs if "rm_loss" in r] == list(range(1, 9))
    valid = [r for r in recs if "valid_accuracy" in r]
    assert [r["iteration"] for r in valid] == [8]
    assert open(os.path.join(rm_ckpt, "latest_checkpointed_iteration.txt")).read().strip() == "8"

    # the evaluate script with TASK=reward reproduces that validation (accuracy over the 32 pairs)
    log = _ok(_run([_script("evaluate", "llama"), "dsw", "-", "-", "auto", "4", "64", "64", "0",
                    "fp32", "1", "1", data["reward"], rm_ckpt, str(tmp_path / "eval")],
                   env=_env(TASK="reward")))
    assert "accuracy:" in log and "chosen_rejected_gap:" in log
    result = json.load(open(_only(_only(tmp_path / "eval" / "log")) + "/evaluation.json"))
    assert result["samples"] == 32
    assert result["accuracy"] == pytest.approx(valid[0]["valid_accuracy"], abs=1e-9)
    assert result["rm loss"] == pytest.approx(valid[0]["valid_rm_loss"], rel=1e-5)


def test_bloom_sft_tutorial_with_trained_bpe(data, tmp_path):
    # 2000 merges: the Alpaca prompts are 61-108 tokens, so SEQ_LEN 128 keeps every response
    tok = train_bpe_folder(str(tmp_path / "bloom_tok"), data["texts"], family="bloom",
                           vocab_size=2000)
    # the tutorial's own defaults otherwise (AC=sel, DO=true, FL=true, PR=fp32 without GPUs)
    log = _ok(_run([_tutorial("step1_sft/bloom_sft.sh")], cwd=str(tmp_path),
                   env=_env(MODEL_SIZE="tiny", LOAD_PATH="none", VOCAB_FILE=tok,
                            DATASET_PATH=data["valid"], SEQ_LEN=128, EPOCHS=1, BATCH_SIZE=4)))
    assert f"tokenizer: {tok}" in log
    out = tmp_path / "output" / "step1_sft"  # the default OUTPUT_DIR, relative to the cwd
    ckpt = _only(out / "checkpoint")
    assert os.path.basename(ckpt).startswith("sft-megatron-bloom-tiny-")
    assert os.path.basename(ckpt).endswith("-seqlen-128-padlen-128-pr-fp32-tp-1-pp-1-ac-sel-do-true-"
                                           "sp-false-ep-1")
    train = [r for r in _metrics(_only(out / "log")) if "lm_loss" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert all(r["lm_loss"] > 1.0 for r in train)
    meta = json.load(open(os.path.join(ckpt, "megatron_patch.json")))
    assert meta["family"] == "bloom" and meta["original_vocab_size"] == 2000
    assert os.path.isfile(os.path.join(ckpt, "tokenizer.json"))
