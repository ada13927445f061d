"""Generation throughput: megatron_patch.generation (KV cache over megatron-core GPTModel) against
``transformers`` ``generate`` with its KV cache, on the same weights (a randomly initialised HF LLaMA,
converted with the production converter), greedy, every row running the full length.

    OMP_NUM_THREADS=1 python benchmarks/generate.py            # CPU: tiny and ~100M LLaMA, batch 8
    python benchmarks/generate.py --gpu                        # GPU: ~1B LLaMA, batch 64, bf16
    python benchmarks/generate.py --gpu --prompt-lens 8:256 --new-tokens 256 --sample
                                                               # a PPO rollout's shape

``--prompt-lens LO:HI`` gives the rows prompts of mixed lengths (our engine left-pads them and
masks the padding keys, ``transformers`` gets them left-padded with an attention mask) and
``--sample`` samples at temperature 1 instead of greedy decoding (``same`` is then not compared:
the two draw from different random streams).

Prints one table row per model: generated tokens/s of both and the ratio (ours / transformers); the
greedy tokens of both are compared too (``same`` = fraction of identical rows; fp32 on CPU should
give 1.00, bf16 on GPU may drift after a near-tie). ``mcore`` is the same engine on a model built
with megatron-core's own attention / linear / MLP modules (``load_for_generation(inference=False)``,
what generation ran on before the inference-only modules of ``models.common.inference``); it runs
in the same alternation (``--no-mcore`` leaves it out).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _llama(layers, hidden, ffn, heads, kv, vocab=32000):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": ffn,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "hidden_act": "silu"}


MODELS = {
    "tiny": _llama(2, 64, 176, 4, 2),
    "100M": _llama(12, 640, 1728, 10, 10),  # ~100M parameters (41M of them embeddings)
    "1B": _llama(16, 2048, 5632, 16, 16),  # ~1.1B, the 1B preset
    # the same with grouped-query attention (4 KV heads), as LLaMA-3, Qwen2 and Mistral have it:
    # on a GPU our SDPA core attention repeats the cached K/V per query head on every step
    "1Bgqa": _llama(16, 2048, 5632, 16, 4),
}


def build(name: str, work: str, dtype):
    import torch
    import transformers as T

    from megatron_patch.convert.engine import hf_to_megatron

    torch.manual_seed(0)
    cfg = T.AutoConfig.for_model(**MODELS[name])
    hf = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    hf_dir, mg_dir = os.path.join(work, f"{name}_hf"), os.path.join(work, f"{name}_mg")
    hf.save_pretrained(hf_dir)
    hf_to_megatron(hf_dir, mg_dir, tp=1, log=lambda *a: None)
    return hf, mg_dir


def bench_alternating(fns, repeats: int):
    """Best time of each function, run alternately (fair under a noisy shared machine), and the
    last output of each."""
    for fn in fns:
        fn()  # warm-up (allocations, first-call paths)
    times = [[] for _ in fns]
    outs = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times], outs


@contextlib.contextmanager
def profiled(title: str, gpu: bool, rows: int = 20):
    """Runs the block under torch.profiler and prints its top operators by device time (on a
    GPU) and by host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) \
            as pr:
        yield
        if gpu:
            torch.cuda.synchronize()
    ev = pr.key_averages()
    for key in (["self_cuda_time_total"] if gpu else []) + ["self_cpu_time_total"]:
        print(f"\n{title}, top operators by {key}")
        print(ev.table(sort_by=key, row_limit=rows))


def prompt_batch(batch: int, prompt_len: int, lens, vocab: int, pad: int):
    """Random prompts: ``batch`` rows of ``prompt_len`` tokens, or with ``lens`` = (lo, hi) rows of
    lengths drawn uniformly in [lo, hi]. Returns (list of id lists for ours, left-padded [b, L]
    ids and their attention mask for ``transformers``)."""
    import torch

    g = torch.Generator().manual_seed(1)
    if lens is None:
        sizes = [prompt_len] * batch
    else:
        sizes = torch.randint(lens[0], lens[1] + 1, (batch,), generator=g).tolist()
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in sizes]
    L = max(sizes)
    ids = torch.full((batch, L), pad, dtype=torch.long)
    mask = torch.zeros((batch, L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    return rows, ids, mask


def run_one(name: str, batch: int, new: int, prompt_len: int, repeats: int, gpu: bool, work: str,
            flash: bool, mcore: bool = True, lens=None, sample: bool = False,
            profile: bool = False):
    import torch

    from megatron_patch import platform
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.loader import load_for_generation

    dtype = torch.bfloat16 if gpu else torch.float32
    hf, mg_dir = build(name, work, dtype)
    lm = load_for_generation(mg_dir, precision="bf16" if gpu else "fp32", flash=flash,
                             log=lambda *a: None)
    base = load_for_generation(mg_dir, precision="bf16" if gpu else "fp32", flash=flash,
                               log=lambda *a: None, inference=False) if mcore else None
    dev = platform.current_device()
    hf.to(dev)
    hf.generation_config.eos_token_id = None
    n_params = sum(p.numel() for p in hf.parameters())
    rows, ids, attn = prompt_batch(batch, prompt_len, lens, MODELS[name]["vocab_size"], 0)
    params = SamplingParams(max_new_tokens=new, greedy=not sample, temperature=1.0, seed=1,
                            return_logprobs=False)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def ours(m=lm):
        out = generate(m.model, rows, params, vocab_size=m.vocab_size)
        sync()
        return out.tokens

    ids, attn = ids.to(dev), attn.to(dev)

    def theirs():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=attn, max_new_tokens=new, pad_token_id=0,
                              **(dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
                                 if sample else dict(do_sample=False)))
        sync()
        return out[:, ids.shape[1]:].cpu()

    fns = [ours, theirs] + ([lambda: ours(base)] if base is not None else [])
    times, outs = bench_alternating(fns, repeats)
    a, b = outs[0], outs[1]
    same = float((a == b).all(dim=1).float().mean())
    if base is not None and not torch.equal(outs[2], a):
        print(f"warning: {name}: megatron-core modules and ours differ", file=sys.stderr)
    if profile:  # one more run of ours: where a generate call's time goes
        with profiled(f"{name}: one generate call", gpu):
            ours()
    toks = batch * new
    del hf, lm, base
    row = {"model": name, "params": n_params, "batch": batch, "new": new,
           "ours": toks / times[0], "hf": toks / times[1], "ratio": times[1] / times[0],
           "same": None if sample else same, "mcore": None, "mcore_ratio": None}
    if len(times) > 2:
        row.update(mcore=toks / times[2], mcore_ratio=times[1] / times[2])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="~1B model at batch 64 in bf16 on the GPU")
    p.add_argument("--models", default=None, help="comma-separated: tiny,100M,1B")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prompt-lens", default=None, metavar="LO:HI",
                   help="prompts of mixed lengths drawn in [LO, HI] (left-padded for "
                        "transformers), as a PPO rollout has them; overrides --prompt-len")
    p.add_argument("--sample", action="store_true",
                   help="sample at temperature 1 (no top-k / top-p) instead of greedy decoding")
    p.add_argument("--repeats", type=int, default=7, help="alternated runs of each (best taken)")
    p.add_argument("--profile", action="store_true",
                   help="print a torch.profiler table of one more generate call of ours")
    p.add_argument("--no-mcore", action="store_true",
                   help="leave out the run on megatron-core's own modules")
    p.add_argument("--no-flash", action="store_true",
                   help="megatron-core's DotProductAttention instead of the SDPA core attention")
    a = p.parse_args(argv)
    if not a.gpu:
        os.environ["MEGATRON_PATCH_DEVICE"] = "cpu"
    import torch

    import megatron_patch  # noqa: F401
    from megatron_patch import platform

    if a.gpu and not platform.use_cuda():
        print("error: --gpu needs a CUDA GPU", file=sys.stderr)
        return 1
    lens = None
    if a.prompt_lens:
        try:
            lens = tuple(int(x) for x in a.prompt_lens.split(":"))
        except ValueError:
            lens = ()
        if len(lens) != 2 or not 1 <= lens[0] <= lens[1]:
            p.error(f"--prompt-lens {a.prompt_lens!r}: expected LO:HI with 1 <= LO <= HI")
    models = (a.models or ("1B" if a.gpu else "tiny,100M")).split(",")
    batch = a.batch or (64 if a.gpu else 8)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for m in models:
            rows.append(run_one(m, batch, a.new_tokens, a.prompt_len, a.repeats, a.gpu, work,
                                flash=not a.no_flash, mcore=not a.no_mcore, lens=lens,
                                sample=a.sample, profile=a.profile))
    dev = torch.cuda.get_device_name() if a.gpu else \
        f"CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    prompts = f"prompts of {lens[0]}-{lens[1]} tokens" if lens else f"prompt {a.prompt_len}"
    print(f"\ngeneration throughput ({dev}; {'sampled' if a.sample else 'greedy'}, {prompts}, "
          f"{a.new_tokens} new tokens, best of {a.repeats}, alternating)")
    print(f"{'model':>6} {'params':>8} {'batch':>5} {'ours tok/s':>11} {'HF tok/s':>10} "
          f"{'ratio':>6} {'same':>5} {'mcore tok/s':>12} {'mcore ratio':>12}")
    for r in rows:
        mc = (f"{r['mcore']:>12.1f} {r['mcore_ratio']:>11.2f}x" if r["mcore"] is not None
              else f"{'-':>12} {'-':>12}")
        print(f"{r['model']:>6} {r['params'] / 1e6:>7.1f}M {r['batch']:>5} {r['ours']:>11.1f} "
              f"{r['hf']:>10.1f} {r['ratio']:>5.2f}x "
              f"{'-' if r['same'] is None else format(r['same'], '.2f'):>5} {mc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
