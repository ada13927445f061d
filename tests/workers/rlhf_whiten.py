"""Worker of tests/test_rlhf_losses.py, run as 2 local gloo ranks by megatron_patch.launch.

argv: IN_PT OUT_PREFIX. IN_PT holds {"x": [B, T], "mask": [B, T], "split": [b0, b1]}; rank r takes
its rows (an uneven split, so ranks hold different row and token counts) and writes
OUT_PREFIX.rank<r>.pt with whiten_across of its slice, with and without shift_mean.

megatron_patch/rlhf/losses.py imports only torch, so it is loaded by path: importing the
megatron_patch package would import megatron-core, seconds per rank for nothing here.
"""
import importlib.util
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_losses():
    path = os.path.join(ROOT, "megatron_patch", "rlhf", "losses.py")
    spec = importlib.util.spec_from_file_location("rlhf_losses_worker", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    losses = load_losses()
    data = torch.load(sys.argv[1])
    dist.init_process_group("gloo", init_method="env://", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    start = sum(data["split"][:rank])
    rows = slice(start, start + data["split"][rank])
    x, mask = data["x"][rows], data["mask"][rows]
    out = {"shifted": losses.whiten_across(x, mask),
           "unshifted": losses.whiten_across(x, mask, group=dist.group.WORLD, shift_mean=False)}
    torch.save(out, f"{sys.argv[2]}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
