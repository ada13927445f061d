"""Worker of tests/test_generation_parallel.py, run as 2 local ranks.

argv: JOB_JSON OUT_PREFIX. JOB_JSON holds {case: {"tp2": dir, "pp2": dir, "tp1": dir}} and the
prompts; each rank writes OUT_PREFIX.rank<r>.json with, per case and layout, the greedy tokens and
log-probs of the mixed-length batch and the tokens of a seeded sampling run. Layouts:
- tp2: the checkpoint converted at TP=2;
- tp2_sp: the same weights in a model built with sequence parallelism (generation turns it off);
- tp2_reshard: the TP=1 checkpoint, resharded to TP=2 by the loader;
- pp2: the checkpoint converted at PP=2 (KV cache per stage, hidden states sent between stages).
Errors are recorded per check, so one failure does not hide the others.
"""
import json
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import megatron_patch  # noqa: E402,F401
import torch.distributed as dist  # noqa: E402


def run_checks(lm, prompts, new):
    from megatron_patch.generation import SamplingParams, generate

    g = generate(lm.model, prompts, SamplingParams(max_new_tokens=new, greedy=True),
                 vocab_size=lm.vocab_size)
    s = generate(lm.model, prompts, SamplingParams(max_new_tokens=new, temperature=0.9, top_k=30,
                                                   top_p=0.95, seed=3),
                 vocab_size=lm.vocab_size)
    return {"greedy": g.tokens.tolist(), "logprobs": g.logprobs.tolist(),
            "sampled": s.tokens.tolist(), "sampled_logprobs": s.logprobs.tolist()}


def sp_model(lm, ckpt):
    """The TP=2 model rebuilt with sequence_parallel=True and loaded from the same rank file."""
    from megatron.core import parallel_state as ps

    from megatron_patch.convert import load
    from megatron_patch.models.builder import arch_from_hf, build_gpt_model, transformer_config

    arch = arch_from_hf(lm.hf_config)
    cfg = transformer_config(arch, tp=2, sequence_parallel=True)
    model = build_gpt_model(arch, cfg, vocab_size=lm.padded_vocab_size)
    load.load_rank(model, ckpt, tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=0, pp_size=1)
    assert model.config.sequence_parallel
    return model


def main():
    from megatron_patch import platform
    from megatron_patch.generation.loader import load_for_generation

    job = json.load(open(sys.argv[1]))
    platform.init_process_group()
    rank = dist.get_rank()
    quiet = lambda *a, **k: None
    res = {}
    for layout_name in ("tp2", "tp2_sp", "tp2_reshard", "pp2"):
        for case, dirs in job["cases"].items():
            r = res.setdefault(case, {})
            try:
                if layout_name == "pp2":
                    lm = load_for_generation(dirs["pp2"], tp=1, pp=2, log=quiet)
                elif layout_name == "tp2_reshard":
                    lm = load_for_generation(dirs["tp1"], tp=2, log=quiet)
                else:
                    lm = load_for_generation(dirs["tp2"], tp=2, log=quiet)
                if layout_name == "tp2_sp":
                    lm.model = sp_model(lm, dirs["tp2"])
                r[layout_name] = run_checks(lm, job["prompts"][case], job["new"])
                if layout_name == "tp2_sp":
                    r[layout_name]["sp_restored"] = bool(lm.model.config.sequence_parallel)
            except Exception:  # noqa: BLE001 - reported to the parent
                r[layout_name] = {"error": traceback.format_exc()[-3000:]}
            dist.barrier()
    with open(f"{sys.argv[2]}.rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
