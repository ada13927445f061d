"""Generation at TP=2 and PP=2 (one 2-process launch): greedy tokens of a mixed-length batch equal
``transformers`` for LLaMA, Bloom (ALiBi), Falcon-7B (one KV group < TP) and GLM; the same with a
model built for sequence parallelism and with a TP=1 checkpoint resharded on load; seeded sampling
gives the same tokens on both ranks and equals the TP=1 tokens; log-probs agree with TP=1.
"""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workers.convert_cases import CASES, build_hf  # noqa: E402

NEW = 8
PARALLEL_CASES = ["llama", "bloom", "falcon_7b", "glm"]
LAYOUTS = ["tp2", "tp2_sp", "tp2_reshard", "pp2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import transformers as T

    import megatron_patch  # noqa: F401
    from megatron_patch.convert.engine import hf_to_megatron
    from megatron_patch.generation import SamplingParams, generate
    from megatron_patch.generation.loader import load_for_generation
    from megatron_patch.launch import launch_local

    work = tmp_path_factory.mktemp("genpar")
    quiet = lambda *a, **k: None
    job = {"cases": {}, "prompts": {}, "new": NEW}
    ref = {}
    for case in PARALLEL_CASES:
        cfg, opts = CASES[case]
        hf_dir = str(work / f"{case}_hf")
        build_hf(cfg, hf_dir)
        dirs = {}
        for name, tp, pp in (("tp1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2)):
            dirs[name] = str(work / f"{case}_{name}")
            hf_to_megatron(hf_dir, dirs[name], tp=tp, pp=pp, log=quiet)
        job["cases"][case] = dirs
        g = torch.Generator().manual_seed(PARALLEL_CASES.index(case))
        prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (4, 11, 7)]
        job["prompts"][case] = prompts
        hf = T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                    attn_implementation=opts.get("attn", "eager"))
        hf.generation_config.eos_token_id = None
        with torch.no_grad():
            hf_tokens = [hf.eval().generate(torch.tensor([p]), do_sample=False, max_new_tokens=NEW,
                                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
        # the TP=1 run of this process: reference for sampling and log-probs
        lm = load_for_generation(dirs["tp1"], log=quiet)
        s = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, temperature=0.9,
                                                       top_k=30, top_p=0.95, seed=3),
                     vocab_size=lm.vocab_size)
        gr = generate(lm.model, prompts, SamplingParams(max_new_tokens=NEW, greedy=True),
                      vocab_size=lm.vocab_size)
        ref[case] = {"hf": hf_tokens, "sampled": s.tokens.tolist(), "greedy": gr.tokens.tolist(),
                     "logprobs": gr.logprobs}
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    job_path = work / "job.json"
    job_path.write_text(json.dumps(job))
    prefix = str(work / "out")
    launch_local([os.path.join(ROOT, "tests", "workers", "generation_parallel.py"), str(job_path),
                  prefix], 2, cwd=ROOT, timeout=600)
    ranks = [json.load(open(f"{prefix}.rank{r}.json")) for r in range(2)]
    return ref, ranks


@pytest.mark.parametrize("case", PARALLEL_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_parallel_generation(results, case, layout):
    ref, ranks = results
    r0, r1 = (r[case][layout] for r in ranks)
    assert "error" not in r0, r0["error"]
    assert "error" not in r1, r1["error"]
    assert r0["greedy"] == ref[case]["hf"] == ref[case]["greedy"]
    assert r1["greedy"] == r0["greedy"]  # both ranks return the same tokens
    assert r1["sampled"] == r0["sampled"] == ref[case]["sampled"]
    torch.testing.assert_close(torch.tensor(r0["logprobs"]), ref[case]["logprobs"])
    torch.testing.assert_close(torch.tensor(r1["logprobs"]), ref[case]["logprobs"])
    if layout == "tp2_sp":
        assert r0["sp_restored"] and r1["sp_restored"]
