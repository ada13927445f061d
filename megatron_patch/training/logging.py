"""Training logs: Megatron-style iteration lines, TensorBoard scalars and ``metrics.jsonl``.

The last rank (last pipeline stage, where the loss lives) writes. ``metrics.jsonl`` holds one JSON
object per logged iteration; when a run resumes at iteration k, records after k (written by the
killed run) are dropped first, so the file keeps exactly one record per iteration.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Optional

import torch.distributed as dist


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(msg: str) -> None:
    if is_last_rank():
        print(msg, flush=True)


def print_rank_0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    def __init__(self, args, start_iteration: int = 0):
        self.active = is_last_rank()
        self.tty = sys.stdout.isatty()
        self.jsonl = None
        self.tb = None
        if not self.active:
            return
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            path = os.path.join(args.log_dir, "metrics.jsonl")
            truncate_metrics(path, start_iteration)
            self.jsonl = open(path, "a")
        if args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
            except ImportError:
                print("warning: tensorboard is not installed; no TensorBoard scalars", flush=True)

    def log_train(self, rec: dict, train_iters: int, eta_s: Optional[float] = None) -> None:
        if not self.active:
            return
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        parts = [f" [{now}] iteration {rec['iteration']:8d}/{train_iters:8d}",
                 f"consumed samples: {rec['consumed_samples']:12d}",
                 f"elapsed time per iteration (ms): {rec['iteration_time_s'] * 1000:.1f}",
                 f"learning rate: {rec['lr']:.6E}"]
        for k, v in rec.items():
            if "loss" in k and k != "loss_scale" and v is not None:
                parts.append(f"{k.replace('_', ' ')}: {v:.6E}")
        parts.append(f"loss scale: {rec['loss_scale']:.1f}")
        if rec.get("grad_norm") is not None:
            parts.append(f"grad norm: {rec['grad_norm']:.3f}")
        parts.append(f"tokens/s: {rec['tokens_per_s']:.0f}")
        if rec.get("tflops_per_gpu") is not None:
            parts.append(f"TFLOP/s/GPU: {rec['tflops_per_gpu']:.1f}")
        if rec.get("skipped"):
            parts.append("skipped (overflow)")
        if self.tty and eta_s is not None:
            done = rec["iteration"] / max(train_iters, 1)
            bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
            parts.append(f"[{bar}] ETA {_fmt_eta(eta_s)}")
        print(" | ".join(parts) + " |", flush=True)
        self._write(rec)
        if self.tb:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                    self.tb.add_scalar(f"train/{k}", v, rec["iteration"])

    def log_valid(self, iteration: int, metrics: dict) -> None:
        if not self.active:
            return
        text = " | ".join(f"{k.replace('_', ' ')} value: {v:.6E}" for k, v in metrics.items())
        line = f" validation at iteration {iteration} | {text}"
        print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)
        self._write({"iteration": iteration, **{f"valid_{k}": v for k, v in metrics.items()}})
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"valid/{k}", v, iteration)

    def log_episode(self, rec: dict, episodes: int) -> None:
        """One RLHF episode: a line of its metrics, the jsonl record, TensorBoard ``rlhf/*``."""
        if not self.active:
            return
        text = " | ".join(f"{k.replace('_', ' ')}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                          for k, v in rec.items() if k != "iteration")
        print(f" episode {rec['iteration']:5d}/{episodes:5d} | {text} |", flush=True)
        self._write(rec)
        if self.tb:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration":
                    self.tb.add_scalar(f"rlhf/{k}", v, rec["iteration"])

    def _write(self, rec: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def truncate_metrics(path: str, last_iteration: int) -> None:
    """Keep only the records of iterations <= last_iteration (the resume point)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("iteration", 0) <= last_iteration:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
