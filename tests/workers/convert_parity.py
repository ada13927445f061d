"""Conversion parity worker (2 ranks): for every case of ``convert_cases`` rank 0 builds the tiny HF
model, converts it at TP=1, TP=2, PP=2 (and EP=2 for MoE), converts back and checks the round trip;
then both ranks run each layout and rank 0 compares the logits with the HF model's.

Usage (through ``megatron_patch.launch.launch_local``, 2 processes):
    python tests/workers/convert_parity.py WORKDIR RESULT_JSON [case ...]
Writes ``{case: {check: "ok" | error text}}`` to RESULT_JSON.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import megatron_patch  # noqa: E402,F401  (patches before megatron)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_patch import platform  # noqa: E402
from megatron_patch.convert import engine, load  # noqa: E402
from megatron_patch.models.builder import arch_from_hf, build_gpt_model, transformer_config  # noqa: E402
from tests.workers.convert_cases import CASES, VOCAB, build_hf  # noqa: E402

SEQ, BATCH = 24, 2
LAYOUTS = {"tp1": dict(tp=1, pp=1, ep=1), "tp2": dict(tp=2, pp=1, ep=1),
           "pp2": dict(tp=1, pp=2, ep=1), "ep2": dict(tp=1, pp=1, ep=2)}


def _err() -> str:
    return traceback.format_exc()[-3000:]


def compare_dirs(a: str, b: str) -> None:
    """The two HF folders hold bit-identical tensors and equal config.json."""
    from safetensors import safe_open

    def tensors(d):
        idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"] \
            if os.path.isfile(os.path.join(d, "model.safetensors.index.json")) else None
        files = sorted(set(idx.values())) if idx else ["model.safetensors"]
        out = {}
        for fn in files:
            with safe_open(os.path.join(d, fn), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
        return out

    ta, tb = tensors(a), tensors(b)
    if sorted(ta) != sorted(tb):
        raise AssertionError(f"tensor names differ: {sorted(set(ta) ^ set(tb))}")
    for k in ta:
        if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]):
            raise AssertionError(f"tensor {k} differs after the round trip")
    ca = json.load(open(os.path.join(a, "config.json")))
    cb = json.load(open(os.path.join(b, "config.json")))
    ca.pop("transformers_version", None), cb.pop("transformers_version", None)
    if ca != cb:
        raise AssertionError(f"config.json differs: {set(ca.items()) ^ set(cb.items())}")


def prepare(work: str, names, results) -> None:
    for name in names:
        hf_cfg, opts = CASES[name]
        d = os.path.join(work, name)
        r = results[name]
        try:
            model = build_hf(hf_cfg, os.path.join(d, "hf"), attn=opts.get("attn", "eager"))
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
            with torch.no_grad():
                ref = model(ids).logits
            torch.save({"ids": ids, "logits": ref}, os.path.join(d, "ref.pt"))
        except Exception:
            r["build"] = _err()
            continue
        for lay, kw in LAYOUTS.items():
            if lay == "ep2" and not opts.get("ep"):
                continue
            try:
                engine.hf_to_megatron(os.path.join(d, "hf"), os.path.join(d, lay), log=lambda *a: None,
                                      **kw)
            except Exception:
                r[lay] = "convert: " + _err()
                continue
            if lay == "tp1":
                continue
            try:  # hf -> mg (this layout) -> hf is bit-identical
                engine.megatron_to_hf(os.path.join(d, lay), os.path.join(d, f"hf_from_{lay}"),
                                      log=lambda *a: None)
                compare_dirs(os.path.join(d, "hf"), os.path.join(d, f"hf_from_{lay}"))
                r[f"roundtrip_{lay}"] = "ok"
            except Exception:
                r[f"roundtrip_{lay}"] = _err()
        if "tp2" in r or not os.path.isdir(os.path.join(d, "tp2")):
            continue
        try:  # Megatron -> Megatron: TP=2 -> PP=2 equals the direct conversion
            engine.reshard(os.path.join(d, "tp2"), os.path.join(d, "reshard_pp2"), tp=1, pp=2,
                           log=lambda *a: None)
            for stage in ("mp_rank_00_000", "mp_rank_00_001"):
                a = torch.load(os.path.join(d, "pp2", "release", stage, "model_optim_rng.pt"))["model"]
                b = torch.load(os.path.join(d, "reshard_pp2", "release", stage,
                                            "model_optim_rng.pt"))["model"]
                assert sorted(a) == sorted(b), (sorted(a), sorted(b))
                for k in a:
                    assert torch.equal(a[k], b[k]), k
            r["reshard_tp2_pp2"] = "ok"
        except Exception:
            r["reshard_tp2_pp2"] = _err()


def run_layout(work: str, lay: str, names, results) -> None:
    kw = LAYOUTS[lay]
    tp, pp, ep = kw["tp"], kw["pp"], kw["ep"]
    parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)
    rank = dist.get_rank()
    for name in names:
        hf_cfg, opts = CASES[name]
        if lay == "ep2" and not opts.get("ep"):
            continue
        d = os.path.join(work, name)
        ok = torch.tensor([1])
        msg = "ok"
        try:
            if not os.path.isdir(os.path.join(d, lay)):
                raise RuntimeError("conversion failed")
            meta = json.load(open(os.path.join(d, lay, "megatron_patch.json")))
            arch = arch_from_hf(hf_cfg)
            cfg = transformer_config(arch, tp=tp, pp=pp, ep=ep)
            model = build_gpt_model(arch, cfg, vocab_size=meta["padded_vocab_size"],
                                    parallel_output=False).eval()
            load.load_rank(model, os.path.join(d, lay),
                           tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                           pp_rank=parallel_state.get_pipeline_model_parallel_rank(), pp_size=pp,
                           ep_rank=parallel_state.get_expert_model_parallel_rank(), ep_size=ep)
            ref = torch.load(os.path.join(d, "ref.pt"))
            ids = ref["ids"]
            pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
            with torch.no_grad():
                if pp == 1:
                    out = model(ids, pos, None)
                else:
                    stage = parallel_state.get_pipeline_model_parallel_rank()
                    if stage == 0:
                        hidden = model(ids, pos, None)  # [s, b, h]
                        dist.send(hidden.contiguous(), dst=1)
                        out = None
                    else:
                        hidden = torch.empty(SEQ, BATCH, arch.config["hidden_size"])
                        dist.recv(hidden, src=0)
                        model.set_input_tensor(hidden)
                        out = model(ids, pos, None)
                        dist.send(out.contiguous(), dst=0)
                    if stage == 0:
                        out = torch.empty(BATCH, SEQ, meta["padded_vocab_size"])
                        dist.recv(out, src=1)
            if rank == 0:
                torch.testing.assert_close(out[..., :VOCAB], ref["logits"])
        except Exception:
            ok = torch.tensor([0])
            msg = _err()
        if rank == 0:
            results[name][lay] = msg
        dist.all_reduce(ok)  # keep the ranks in step even when one fails
    parallel_state.destroy_model_parallel()


def main() -> None:
    work, out = sys.argv[1], sys.argv[2]
    names = sys.argv[3:] or list(CASES)
    platform.init_process_group()
    rank = dist.get_rank()
    results = {n: {} for n in names}
    if rank == 0:
        prepare(work, names, results)
    dist.barrier()
    for lay in LAYOUTS:
        run_layout(work, lay, names, results)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
