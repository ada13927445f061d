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
ALL_LAYOUTS = {"tp1": dict(tp=1, pp=1, ep=1), "tp2": dict(tp=2, pp=1, ep=1),
               "pp2": dict(tp=1, pp=2, ep=1), "ep2": dict(tp=1, pp=1, ep=2),
               "tp2pp2": dict(tp=2, pp=2, ep=1), "tp2ep2": dict(tp=2, pp=1, ep=2)}
# CONVERT_LAYOUTS picks the layouts (the 4-process run uses tp2pp2,tp2ep2)
LAYOUTS = {k: ALL_LAYOUTS[k] for k in
           os.environ.get("CONVERT_LAYOUTS", "tp1,tp2,pp2,ep2").split(",")}


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
            if "ep2" in lay and not opts.get("ep"):
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
                import transformers as T

                T.AutoModelForCausalLM.from_pretrained(os.path.join(d, f"hf_from_{lay}"))
                r[f"roundtrip_{lay}"] = "ok"
            except Exception:
                r[f"roundtrip_{lay}"] = _err()
        if "tp2" in r or not os.path.isdir(os.path.join(d, "tp2")) or \
                not os.path.isdir(os.path.join(d, "pp2")):
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


def save_torch_dist(model, converted: str, root: str) -> None:
    """Collective: save the loaded TP=2 model as a torch_dist checkpoint at iteration 7, with the
    converted checkpoint's metadata (what a training run started from it would carry)."""
    import shutil

    from megatron.core import dist_checkpointing

    from megatron_patch.convert import layout

    d = os.path.join(root, layout.iter_dirname(7))
    if dist.get_rank() == 0:
        os.makedirs(d, exist_ok=True)
        for f in ("megatron_patch.json", "config.json"):
            shutil.copy(os.path.join(converted, f), os.path.join(root, f))
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "iteration": 7}, d)
    dist.barrier()
    if dist.get_rank() == 0:
        layout.write_tracker(root, 7)


def run_layout(work: str, lay: str, names, results) -> None:
    kw = LAYOUTS[lay]
    tp, pp, ep = kw["tp"], kw["pp"], kw["ep"]
    parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)
    ps = parallel_state
    stage = ps.get_pipeline_model_parallel_rank()
    checker = stage == pp - 1 and ps.get_tensor_model_parallel_rank() == 0 and \
        ps.get_data_parallel_rank() == 0
    for name in names:
        hf_cfg, opts = CASES[name]
        if "ep2" in lay and not opts.get("ep"):
            continue
        d = os.path.join(work, name)
        msg = "ok"
        try:
            if not os.path.isdir(os.path.join(d, lay)):
                raise RuntimeError("conversion failed")
            meta = json.load(open(os.path.join(d, lay, "megatron_patch.json")))
            arch = arch_from_hf(hf_cfg)
            cfg = transformer_config(arch, tp=tp, pp=pp, ep=ep, sequence_parallel=ep > 1 and tp > 1)
            model = build_gpt_model(arch, cfg, vocab_size=meta["padded_vocab_size"],
                                    parallel_output=False).eval()
            load.load_rank(model, os.path.join(d, lay), tp_rank=ps.get_tensor_model_parallel_rank(),
                           pp_rank=stage, pp_size=pp, ep_rank=ps.get_expert_model_parallel_rank(),
                           ep_size=ep)
            ref = torch.load(os.path.join(d, "ref.pt"))
            ids = ref["ids"]
            pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
            with torch.no_grad():
                if stage > 0:
                    hidden = torch.empty(SEQ, BATCH, arch.config["hidden_size"])  # [s, b, h]
                    dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                    model.set_input_tensor(hidden)
                out = model(ids, pos, None)
                if stage < pp - 1:
                    dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            if checker:
                torch.testing.assert_close(out[..., :VOCAB], ref["logits"])
            if lay == "tp2" and opts.get("torch_dist"):
                save_torch_dist(model, os.path.join(d, lay), os.path.join(d, "tp2_torch_dist"))
        except Exception:
            msg = _err()
        if checker or msg != "ok":
            with open(os.path.join(d, f"{lay}.rank{dist.get_rank()}.result"), "w") as f:
                f.write(msg)
        dist.barrier()
    if dist.get_rank() == 0:
        for name in names:
            d = os.path.join(work, name)
            files = sorted(f for f in os.listdir(d) if f.startswith(f"{lay}.rank"))
            msgs = [open(os.path.join(d, f)).read() for f in files]
            bad = [m for m in msgs if m != "ok"]
            if files:
                results[name][lay] = bad[0] if bad else "ok"
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
