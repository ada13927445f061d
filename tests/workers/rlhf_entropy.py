"""Worker of tests/test_rlhf_losses.py, run as 2 local gloo ranks by megatron_patch.launch.

argv: IN_PT OUT_PREFIX. IN_PT holds {"logits": [B, T, V], "weights": [B, T], "split": [v0, v1]};
rank r takes its slice of the vocabulary (uneven), computes ``vocab_parallel_entropy`` over the
world group and the gradient of sum(weights * H) with respect to its slice, and writes
OUT_PREFIX.rank<r>.pt with both. losses.py is loaded by path (see rlhf_whiten.py).
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rlhf_whiten import load_losses  # noqa: E402


def main():
    losses = load_losses()
    data = torch.load(sys.argv[1])
    dist.init_process_group("gloo", init_method="env://", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    start = sum(data["split"][:rank])
    part = data["logits"][..., start:start + data["split"][rank]].clone().requires_grad_(True)
    ent = losses.vocab_parallel_entropy(part, dist.group.WORLD)
    (ent * data["weights"]).sum().backward()
    torch.save({"entropy": ent.detach(), "grad": part.grad}, f"{sys.argv[2]}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
