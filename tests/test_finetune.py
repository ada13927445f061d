"""SFT and reward-model training through ``megatron_patch.training.finetune`` (several processes).

Real dialogs (chatterbot-corpus) with a byte-level BPE trained in-process; every run starts from the
same tiny LLaMA (a ``torch_dist`` checkpoint, resharded on load):
- SFT losses at TP=2 and PP=2 equal TP=1; the per-token loss is the same for DP=1 and DP=2 and for
  1, 2 and 4 accumulation steps;
- a run stopped after its checkpoint at iteration 5 (mid-epoch) and rerun gives the uninterrupted
  losses exactly; validation loss goes down over the epochs;
- a reward model started from the SFT checkpoint learns a preference decided by a property of the
  response (shouting: the rejected answer is the chosen one in capitals) to >= 90% validation
  accuracy, and its checkpoint says it is a reward model;
- parity: an HF ``LlamaForSequenceClassification`` converted at TP=2 scores pairs exactly as HF does
  (loss and chosen-rejected gap of an evaluation over every pair).
"""
import json
import os
import random

import pytest

from data_fixtures import chatterbot_dialogs, train_bpe_folder
from megatron_patch.launch import launch_local

SEQ = "64"


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("finetune"))
    pairs = [(q, a) for q, a in chatterbot_dialogs("english") if len(q) + len(a) < 100]
    random.Random(0).shuffle(pairs)
    tok = train_bpe_folder(os.path.join(tmp, "tok"), [q + " " + a for q, a in pairs] +
                           [(q + " " + a).upper() for q, a in pairs], vocab_size=1000)

    def chat(rows):
        return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in rows]
    sft_train = _write(os.path.join(tmp, "sft_train.jsonl"), chat(pairs[:128]))
    sft_valid = _write(os.path.join(tmp, "sft_valid.jsonl"), chat(pairs[128:160]))
    # the rows hold the responses (the checks below would hold vacuously on empty loss masks)
    from megatron_patch.data.sft import SFTDataset
    from megatron_patch.tokenizer import build_tokenizer

    for path in (sft_train, sft_valid):
        ds = SFTDataset([path], build_tokenizer("auto", tok), int(SEQ))
        trained = [ds[i]["loss_mask"].sum().item() for i in range(len(ds))]
        assert sum(t >= 3 for t in trained) >= 0.9 * len(ds), trained

    def rm(rows):
        return [{"prompt": f"Human: {q}\n\nAssistant: ", "chosen": a, "rejected": a.upper()}
                for q, a in rows if a.upper() != a]
    rm_train = _write(os.path.join(tmp, "rm_train.jsonl"), rm(pairs[160:352]))
    rm_valid = _write(os.path.join(tmp, "rm_valid.jsonl"), rm(pairs[352:392]))
    init = os.path.join(tmp, "init")
    launch_local(["-m", "megatron_patch.training.pretrain", "--mock-data", "--tokenizer-model", tok,
                  "--seq-length", SEQ, "--micro-batch-size", "1", "--global-batch-size", "1",
                  "--train-iters", "0", "--save", init, "--ckpt-format", "torch_dist",
                  "--seed", "3"], 1)
    return dict(tmp=tmp, tok=tok, sft_train=sft_train, sft_valid=sft_valid, rm_train=rm_train,
                rm_valid=rm_valid, init=init)


def metrics(log_dir, key):
    train, valid = {}, {}
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if key in rec:
                assert rec["iteration"] not in train, f"duplicate iteration {rec['iteration']}"
                train[rec["iteration"]] = rec[key]
            for k, v in rec.items():
                if k.startswith("valid_"):
                    valid.setdefault(rec["iteration"], {})[k] = v
    return [train[k] for k in sorted(train)], valid


def finetune(ws, name, nproc, *flags, key="lm_loss"):
    log = os.path.join(ws["tmp"], name, "log")
    launch_local(["-m", "megatron_patch.training.finetune", "--tokenizer-model", ws["tok"],
                  "--seq-length", SEQ, "--lr", "2e-3", "--seed", "11", "--log-dir", log,
                  "--pretrained-checkpoint", ws["init"], *flags], nproc, timeout=600)
    return metrics(log, key)


def sft(ws, name, nproc, *flags):
    return finetune(ws, name, nproc, "--task", "sft", "--train-data", ws["sft_train"],
                    "--valid-data", ws["sft_valid"], *flags)


@pytest.fixture(scope="module")
def reference(ws):
    return sft(ws, "ref", 1, "--train-iters", "5", "--micro-batch-size", "2",
               "--global-batch-size", "8")[0]


def close(a, b, rel=1e-5):
    assert len(a) == len(b) == 5, (a, b)
    assert min(b) > 1.0, b
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


@pytest.mark.parametrize("name,nproc,flags", [
    ("tp2", 2, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2"]),
    ("pp2", 2, ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2"]),
    ("dp2", 2, ["--micro-batch-size", "2", "--use-distributed-optimizer"]),  # 2 accumulation steps
    ("acc1", 1, ["--micro-batch-size", "8"]),
    ("acc8", 1, ["--micro-batch-size", "1"]),
])
def test_sft_parallel_and_accumulation_equal_reference(ws, reference, name, nproc, flags):
    got, _ = sft(ws, name, nproc, "--train-iters", "5", "--global-batch-size", "8", *flags)
    close(got, reference)


def test_sft_resume_is_exact_and_validation_improves(ws):
    flags = ["--epochs", "3", "--micro-batch-size", "4", "--global-batch-size", "16"]
    full, valid = sft(ws, "full", 1, *flags)
    assert len(full) == 3 * 128 // 16
    epochs = sorted(valid)
    assert epochs == [8, 16, 24], valid
    assert valid[24]["valid_lm_loss"] < valid[8]["valid_lm_loss"] - 0.1, valid
    ck = os.path.join(ws["tmp"], "resume", "ckpt")
    more = ["--save", ck, "--load", ck, "--save-interval", "5", *flags]
    sft(ws, "resume", 1, *more, "--exit-interval", "5")
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read().strip() == "5"
    got, _ = sft(ws, "resume", 1, *more)
    assert got == full
    ws["sft_ckpt"] = ck


def test_reward_model_learns_a_preference(ws):
    if "sft_ckpt" not in ws:  # run alone: train the SFT checkpoint the resume test leaves
        ck = os.path.join(ws["tmp"], "sft_for_rm", "ckpt")
        sft(ws, "sft_for_rm", 1, "--epochs", "3", "--micro-batch-size", "4",
            "--global-batch-size", "16", "--save", ck)
        ws["sft_ckpt"] = ck
    ck = os.path.join(ws["tmp"], "rm", "ckpt")
    log = os.path.join(ws["tmp"], "rm", "log")
    launch_local(["-m", "megatron_patch.training.finetune", "--task", "reward",
                  "--tokenizer-model", ws["tok"], "--seq-length", SEQ, "--lr", "1e-3",
                  "--train-data", ws["rm_train"], "--valid-data", ws["rm_valid"], "--epochs", "4",
                  "--micro-batch-size", "4", "--global-batch-size", "8", "--log-dir", log,
                  "--pretrained-checkpoint", ws["sft_ckpt"], "--save", ck, "--seed", "5"], 1,
                 timeout=600)
    _, valid = metrics(log, "rm_loss")
    last = valid[max(valid)]
    assert last["valid_accuracy"] >= 0.9, valid
    assert last["valid_chosen_rejected_gap"] > 0
    meta = json.load(open(os.path.join(ck, "megatron_patch.json")))
    assert meta["reward_model"] is True


def test_reward_score_at_tp2_equals_transformers(ws):
    import torch
    import torch.nn.functional as F
    import transformers as T

    from megatron_patch.convert import engine
    from megatron_patch.data.reward import RewardDataset
    from megatron_patch.tokenizer import build_tokenizer

    tok = build_tokenizer("auto", ws["tok"])
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                        max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                        num_labels=1, pad_token_id=tok.pad)
    torch.manual_seed(0)
    hf = T.LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_dir, mg_dir = (os.path.join(ws["tmp"], "rm_parity", x) for x in ("hf", "mg"))
    hf.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    engine.hf_to_megatron(hf_dir, mg_dir, tp=2, log=lambda *a: None)

    ds = RewardDataset([ws["rm_valid"]], tok, int(SEQ))
    n = len(ds)
    log = os.path.join(ws["tmp"], "rm_parity", "log")
    launch_local(["-m", "megatron_patch.training.finetune", "--task", "reward", "--eval-only",
                  "--model-size", "auto", "--valid-data", ws["rm_valid"], "--seq-length", SEQ,
                  "--tensor-model-parallel-size", "2", "--micro-batch-size", str(n),
                  "--global-batch-size", str(n), "--pretrained-checkpoint", mg_dir,
                  "--log-dir", log], 2, timeout=600)
    ours = json.load(open(os.path.join(log, "evaluation.json")))
    assert ours["samples"] == n

    rewards = []
    with torch.no_grad():
        for i in range(n):
            item = ds[i]
            L = int(item["lengths"].max())
            ids = item["tokens"][:, :L]
            h = hf.model(input_ids=ids, attention_mask=(torch.arange(L) < item["lengths"][:, None]).long()
                         ).last_hidden_state
            scores = hf.score(h).squeeze(-1)  # [2, L]
            rewards.append(scores[torch.arange(2), item["lengths"] - 1])
    r = torch.stack(rewards).double()  # [n, 2], chosen first
    diff = r[:, 0] - r[:, 1]
    loss = (-F.logsigmoid(diff)).mean().item()
    assert abs(ours["rm loss"] - loss) <= 1e-5 * abs(loss), (ours, loss)
    assert abs(ours["chosen_rejected_gap"] - diff.mean().item()) <= 1e-5 * diff.abs().mean().item()
    assert ours["accuracy"] == (diff > 0).double().mean().item()


def test_sft_packing_trains_with_micro_batches(ws):
    """--packing into 256-token rows (--pad-len) with micro batch 2 at TP=2."""
    from megatron_patch.data.sft import SFTDataset
    from megatron_patch.tokenizer import build_tokenizer

    packed = SFTDataset([ws["sft_train"]], build_tokenizer("auto", ws["tok"]), int(SEQ),
                        pad_len=256, packing=True)
    assert len(packed) <= 128 / 3
    got, valid = sft(ws, "packed", 2, "--packing", "--pad-len", "256", "--epochs", "3",
                     "--micro-batch-size", "2", "--global-batch-size", "4",
                     "--tensor-model-parallel-size", "2")
    assert len(got) == 3 * (len(packed) // 4)
    assert all(x > 1.0 for x in got)
    assert valid[max(valid)]["valid_lm_loss"] < valid[min(valid)]["valid_lm_loss"]


def test_bad_finetune_input_is_one_line_error(ws):
    from megatron_patch.launch import WorkerError

    cases = [
        # prompts longer than the rows: nothing would be trained
        (["--task", "sft", "--train-data", ws["sft_train"], "--epochs", "1", "--seq-length", "6"],
         "no sample keeps a response token"),
        (["--task", "sft", "--train-data", ws["sft_train"], "--epochs", "1",
          "--global-batch-size", "512"], "fewer than the global batch size 512"),
        (["--task", "reward", "--packing", "--train-data", ws["rm_train"], "--epochs", "1"],
         "--packing is for --task sft"),
        (["--task", "sft", "--eval-only", "--valid-data", ws["sft_valid"]], "needs a checkpoint"),
    ]
    for flags, message in cases:
        argv = ["-m", "megatron_patch.training.finetune", "--tokenizer-model", ws["tok"],
                "--seq-length", SEQ, "--micro-batch-size", "1", *flags]
        with pytest.raises(WorkerError) as e:
            launch_local(argv, 1)
        lines = [x for x in str(e.value).splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], str(e.value)[-2000:]


def test_reward_model_resume_is_exact(ws):
    """Stopped after its checkpoint at iteration 3 (mid-epoch) and rerun, the reward model's losses
    equal the uninterrupted run's."""
    flags = ["--task", "reward", "--train-data", ws["rm_train"], "--train-iters", "6",
             "--micro-batch-size", "4", "--global-batch-size", "8"]
    full, _ = finetune(ws, "rm_full", 1, *flags, key="rm_loss")
    assert len(full) == 6
    ck = os.path.join(ws["tmp"], "rm_resume", "ckpt")
    more = [*flags, "--save", ck, "--load", ck, "--save-interval", "3"]
    finetune(ws, "rm_resume", 1, *more, "--exit-interval", "3", key="rm_loss")
    got, _ = finetune(ws, "rm_resume", 1, *more, key="rm_loss")
    assert got == full
