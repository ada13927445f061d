"""Run an HF model and a Megatron checkpoint (any TP/PP/EP, as local processes) on the same token ids
and report how far apart their logits are: max |delta logits|, mean KL(HF || Megatron) per token and
top-1 agreement. ``compare(...)`` returns the numbers; ``main`` prints them and exits 1 when the max
difference is above the threshold.

What is normal: a correct fp32 conversion differs by float summation order only (max |delta| around
1e-5 or less, KL ~ 1e-10, top-1 agreement 1.0); bf16 weights give around 1e-2. Differences of 1e-1
and more, or top-1 agreement below ~0.99, mean a wrong conversion.

The Megatron side runs in ``TP x PP x EP`` processes started by ``megatron_patch.launch``; each
stage passes its hidden states to the next with point-to-point sends; the last stage's first TP rank
writes the (TP-gathered) logits to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional

import torch


def _worker(mg_dir: str, ids_path: str, out_path: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_patch import platform
    from megatron_patch.convert import layout, load, mg_io
    from megatron_patch.convert.engine import family_and_arch, num_experts
    from megatron_patch.models.builder import build_gpt_model, transformer_config

    meta = layout.read_meta(mg_dir)
    hf_config = meta.get("hf_config") or layout.read_hf_config(mg_dir)
    fam, arch = family_and_arch(hf_config, meta.get("family"))
    reader = mg_io.MegatronReader(mg_dir, arch.config["num_layers"], num_experts(arch))
    tp, pp, ep = reader.tp, reader.pp, reader.ep
    del reader
    platform.init_process_group()
    ps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(1234)
    # megatron-core requires sequence parallelism for MoE with TP > 1
    sp = tp > 1 and num_experts(arch) > 0
    cfg = transformer_config(arch, tp=tp, pp=pp, ep=ep, sequence_parallel=sp)
    padded = int(meta.get("padded_vocab_size") or arch.model["vocab_size"])
    model = build_gpt_model(arch, cfg, vocab_size=padded, parallel_output=False).eval()
    load.load_rank(model, mg_dir, tp_rank=ps.get_tensor_model_parallel_rank(),
                   pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=pp,
                   ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ep)
    ids = torch.load(ids_path)
    b, s = ids.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    stage = ps.get_pipeline_model_parallel_rank()
    with torch.no_grad():
        if stage > 0:
            # [s, b, h], or [s/tp, b, h] under sequence parallelism
            hidden = torch.empty(s // tp if sp else s, b, arch.config["hidden_size"])
            dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, pos, None)
        if stage < pp - 1:
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    if stage == pp - 1 and ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_data_parallel_rank() == 0:
        torch.save(out[..., : int(meta.get("original_vocab_size") or padded)].float(), out_path)
    dist.barrier()


def metrics(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """ref/out: [b, s, V] logits."""
    ref, out = ref.double(), out.double()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)  # [b, s]
    return {"max_abs_diff": float((ref - out).abs().max()), "mean_kl": float(kl.mean()),
            "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).double().mean())}


def compare(hf_dir: str, mg_dir: str, *, batch: int = 2, seq_len: int = 32, seed: int = 0,
            timeout: float = 1800) -> dict:
    import transformers as T

    from megatron_patch.convert import layout, mg_io
    from megatron_patch.convert.engine import family_and_arch, num_experts
    from megatron_patch.launch import launch_local

    meta = layout.read_meta(mg_dir)
    if meta.get("reward_model"):
        raise ValueError("reward checkpoints have no LM head to compare; compare the base model")
    hf_config = meta.get("hf_config") or layout.read_hf_config(mg_dir)
    fam, arch = family_and_arch(hf_config, meta.get("family"))
    reader = mg_io.MegatronReader(mg_dir, arch.config["num_layers"], num_experts(arch))
    world = reader.tp * reader.pp * reader.ep
    del reader
    vocab = int(hf_config.get("vocab_size") or arch.model["vocab_size"])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out_path = os.path.join(tmp, "ids.pt"), os.path.join(tmp, "logits.pt")
        torch.save(ids, ids_path)
        launch_local(["-m", "megatron_patch.convert.compare", "--worker", mg_dir, ids_path,
                      out_path], world, timeout=timeout)
        out = torch.load(out_path)
    try:  # SDPA where the architecture has it (Falcon-RW's reference needs it) ...
        model = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                       attn_implementation="sdpa").eval()
    except ValueError as e:  # ... else its only attention (Bloom: eager)
        if "scaled_dot_product_attention" not in str(e):
            raise
        model = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(ids).logits.float()
    n = min(ref.shape[-1], out.shape[-1])
    res = metrics(ref[..., :n], out[..., :n])
    res.update(family=fam.name, world_size=world, tokens=batch * seq_len)
    return res


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        _worker(*argv[1:4])
        return 0
    p = argparse.ArgumentParser(description="compare an HF model with a Megatron checkpoint")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--megatron-dir", required=True)
    p.add_argument("--threshold", type=float, default=1e-3,
                   help="fail when max |delta logits| is above this (default 1e-3: fp32 "
                        "conversions land near 1e-5, bf16 near 1e-2)")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    a = p.parse_args(argv)
    res = compare(a.hf_dir, a.megatron_dir, batch=a.batch, seq_len=a.seq_len, seed=a.seed)
    ok = res["max_abs_diff"] <= a.threshold
    res["threshold"], res["ok"] = a.threshold, ok
    if a.json:
        print(json.dumps(res))
    else:
        print(f"family {res['family']}, {res['world_size']} Megatron process(es), "
              f"{res['tokens']} tokens")
        print(f"max |delta logits|   {res['max_abs_diff']:.3e}")
        print(f"mean KL(HF || MG)    {res['mean_kl']:.3e}")
        print(f"top-1 agreement      {res['top1_agreement']:.4f}")
        print(("OK" if ok else "FAIL") + f": threshold {a.threshold:g} on max |delta logits|")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        import megatron_patch  # noqa: F401  (patches before megatron is used)
    sys.exit(main())
