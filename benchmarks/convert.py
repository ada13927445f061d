"""Conversion speed and memory against the disk floor.

Builds a ~1B-parameter model with random weights from a real config (LLaMA "1B" preset by default,
bf16), writes it as an HF checkpoint, then times HF -> Megatron at TP=2 PP=2 and Megatron -> HF,
each in a child process whose anonymous memory (RssAnon: memory the process really holds, not the
reclaimable page cache of memory-mapped files) is sampled every 5 ms. The floor of each direction is
measured in the same run on the same disk: read every input file and write as many bytes as the
conversion writes.

    python benchmarks/convert.py [--family llama --preset 1B --dtype bf16 --tp 2 --pp 2 --workdir DIR]

Prints one table; goals: time <= 2x floor, peak <= 1.5x the largest layer + one output shard.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_CHUNK = 64 * 1024 * 1024


def _files(d):
    out = []
    for base, _, names in os.walk(d):
        out += [os.path.join(base, n) for n in names]
    return out


def _bytes(d, pattern=r".*"):
    return sum(os.path.getsize(f) for f in _files(d) if re.search(pattern, f))


def floor_seconds(src_dir: str, write_bytes: int, scratch: str) -> float:
    """Read every file of src_dir and write write_bytes to scratch files (64 MiB blocks)."""
    buf = bytearray(_CHUNK)
    t = time.perf_counter()
    for f in _files(src_dir):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    os.makedirs(scratch, exist_ok=True)
    left, k = write_bytes, 0
    while left > 0:
        with open(os.path.join(scratch, f"f{k}"), "wb") as fh:
            for _ in range(16):  # 1 GiB files
                n = min(left, _CHUNK)
                if n <= 0:
                    break
                fh.write(memoryview(buf)[:n])
                left -= n
        k += 1
    dt = time.perf_counter() - t
    shutil.rmtree(scratch)
    return dt


def _sampler(stop, peak):
    while not stop.is_set():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.005)


def child(cmd: str, src: str, dst: str, tp: int, pp: int) -> None:
    from megatron_patch.convert import engine

    stop, peak = threading.Event(), [0]
    th = threading.Thread(target=_sampler, args=(stop, peak), daemon=True)
    base = [0]
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                base[0] = int(line.split()[1]) * 1024
    th.start()
    t = time.perf_counter()
    if cmd == "hf2mg":
        engine.hf_to_megatron(src, dst, tp=tp, pp=pp, log=lambda *a: None)
    else:
        engine.megatron_to_hf(src, dst, log=lambda *a: None)
    dt = time.perf_counter() - t
    stop.set()
    th.join()
    print(json.dumps({"seconds": dt, "peak_anon": peak[0], "base_anon": base[0]}))


def make_hf(out: str, family: str, preset: str, dtype: str) -> dict:
    import torch
    import transformers as T

    from megatron_patch.convert.hf_io import HFWriter
    from megatron_patch.models.registry import get_family

    cfg_dict = get_family(family).preset(preset)
    cfg = T.AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    w = HFWriter(out, max_shard_bytes=2 * 1024 ** 3)
    g = torch.Generator().manual_seed(0)
    layer_bytes, other = {}, []
    for name, p in model.state_dict().items():
        t = (torch.randn(p.shape, generator=g) * 0.02).to(dt)
        w.add(name, t)
        n = t.numel() * t.element_size()
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            layer_bytes[m.group(1)] = layer_bytes.get(m.group(1), 0) + n
        else:
            other.append(n)
        del t
    w.close()
    cfg_dict["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg_dict, f)
    params = sum(p.numel() for p in model.state_dict().values())
    return {"params": params, "largest_layer": max(list(layer_bytes.values()) + other)}


def run_child(cmd, src, dst, tp, pp) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", cmd, src, dst,
                        str(tp), str(pp)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{cmd} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        c, src, dst, tp, pp = sys.argv[2:7]
        child(c, src, dst, int(tp), int(pp))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="llama")
    p.add_argument("--preset", default="1B")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="convert-bench-", dir=os.environ.get("TMPDIR", "/tmp"))
    os.makedirs(work, exist_ok=True)
    hf, mg, back = (os.path.join(work, n) for n in ("hf", "mg", "back"))
    try:
        info = make_hf(hf, a.family, a.preset, a.dtype)
        hf_bytes = _bytes(hf, r"\.safetensors$")
        r1 = run_child("hf2mg", hf, mg, a.tp, a.pp)
        mg_bytes = _bytes(mg, r"model_optim_rng\.pt$")
        f1 = floor_seconds(hf, mg_bytes, os.path.join(work, "scratch"))
        r2 = run_child("mg2hf", mg, back, a.tp, a.pp)
        back_bytes = _bytes(back, r"\.safetensors$")
        f2 = floor_seconds(mg, back_bytes, os.path.join(work, "scratch"))
        rank_max = max(os.path.getsize(f) for f in _files(mg) if f.endswith(".pt"))
        shard_max = max(os.path.getsize(f) for f in _files(back) if f.endswith(".safetensors"))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    L = info["largest_layer"]
    mib = 1024 ** 2
    print(f"model: {a.family} {a.preset}, {info['params'] / 1e9:.2f}B parameters, {a.dtype}, "
          f"HF {hf_bytes / mib:.0f} MiB; largest layer {L / mib:.0f} MiB")
    print(f"{'direction':<22}{'seconds':>9}{'floor s':>9}{'x floor':>9}{'peak MiB':>10}"
          f"{'budget MiB':>12}{'x budget':>10}")
    for name, r, fl, shard in ((f"hf->mg TP{a.tp} PP{a.pp}", r1, f1, rank_max),
                               ("mg->hf", r2, f2, shard_max)):
        peak = r["peak_anon"] - r["base_anon"]
        budget = 1.5 * L + shard
        print(f"{name:<22}{r['seconds']:>9.1f}{fl:>9.1f}{r['seconds'] / fl:>9.2f}"
              f"{peak / mib:>10.0f}{budget / mib:>12.0f}{peak / budget:>10.2f}")
    print("peak = RssAnon above the process's baseline after imports; budget = 1.5 x largest "
          "layer + largest output file (rank file / safetensors shard)")


if __name__ == "__main__":
    main()
