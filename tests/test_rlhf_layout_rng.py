"""Each RLHF layout has its own megatron-core RNG tracker (2 processes, TP=1 and TP=2 layouts).

megatron-core seeds the tracked model-parallel stream with seed + 2718 + TP rank; its dropout in
TP regions forks that stream. A role on a second layout used the first layout's tracker: the two TP
ranks of a TP=2 role beside a TP=1 policy forked the same stream (identical dropout masks).
"""
import json

from megatron_patch.launch import launch_local

WORKER = r"""
import json, sys
import megatron_patch  # noqa: F401
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import random as mr
from megatron_patch.rlhf.layouts import Layouts
from megatron_patch.training import engine
from megatron_patch.training.arguments import build_parser

out = sys.argv[1]
args = build_parser().parse_args(["--mock-data", "--vocab-size", "256", "--seq-length", "16",
                                  "--train-iters", "1", "--seed", "11"])
engine.initialize(args)  # TP=1, DP=2
first, second = (1, 1, None, 1), (2, 1, None, 1)
layouts = Layouts(first, seed=11)
cpu = torch.get_rng_state()
layouts.add(second)


def stream():
    return mr.get_cuda_rng_tracker().get_states()["model-parallel-rng"]


def seeded(tp_rank):
    return torch.Generator().manual_seed(11 + 2718 + tp_rank)


res = {"cpu_untouched": torch.equal(cpu, torch.get_rng_state()),
       "first": torch.equal(stream(), seeded(0).get_state())}
with layouts.use(second):
    tp_rank = ps.get_tensor_model_parallel_rank()
    res["tp_rank"] = tp_rank
    res["second"] = torch.equal(stream(), seeded(tp_rank).get_state())
    with mr.get_cuda_rng_tracker().fork():
        x = torch.rand(4)
res["first_after"] = torch.equal(stream(), seeded(0).get_state())
with layouts.use(second):
    with mr.get_cuda_rng_tracker().fork():
        y = torch.rand(4)
    res["continued"] = torch.equal(torch.cat([x, y]), torch.rand(8, generator=seeded(tp_rank)))
json.dump(res, open(f"{out}.{dist.get_rank()}", "w"))
"""


def test_each_layout_forks_its_own_seeded_streams(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "r"
    launch_local([str(worker), str(out)], 2, timeout=300)
    res = [json.loads((tmp_path / f"r.{rank}").read_text()) for rank in (0, 1)]
    assert [r["tp_rank"] for r in res] == [0, 1], res
    for r in res:
        # the second layout's stream is its TP rank's (before: the first layout's, TP rank 0 on
        # both ranks), it continues across use() calls, and neither the first layout's stream nor
        # the generator moved
        assert r["second"] and r["continued"], r
        assert r["first"] and r["first_after"] and r["cpu_untouched"], r
