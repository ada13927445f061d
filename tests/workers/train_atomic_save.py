"""Worker: a save that dies half-way leaves the previous checkpoint loadable and `latest` on it."""
import json
import os
import sys

import megatron_patch  # noqa: F401
import torch

from megatron_patch.convert import layout
from megatron_patch.training import checkpointing, engine
from megatron_patch.training.arguments import build_parser
from megatron_patch.training.pretrain import VocabOnlyTokenizer


def main(out_path, root):
    args = build_parser().parse_args([
        "--mock-data", "--vocab-size", "256", "--seq-length", "32", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", "4", "--lr", "1e-3", "--save", root])
    arch = engine.resolve_arch(args)  # first: it resolves the virtual pipeline size
    engine.initialize(args)
    config = engine.build_config(args, arch)
    model = engine.build_model(args, arch, config, 256)
    opt, sched = engine.build_optimizer(args, model)
    state = engine.TrainState(iteration=1, consumed_train_samples=2)
    checkpointing.save_checkpoint(root, 1, model, opt, sched, {"consumed_train_samples": 2})
    saved = {k: v.clone() for k, v in checkpointing.unwrap(model[0]).state_dict().items()
             if torch.is_tensor(v)}
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)
    real = layout.atomic_torch_save

    def dying_save(obj, path):
        raise OSError("disk full (simulated)")

    layout.atomic_torch_save = dying_save
    died = False
    try:
        checkpointing.save_checkpoint(root, 2, model, opt, sched, {"consumed_train_samples": 4})
    except OSError:
        died = True
    layout.atomic_torch_save = real
    result = {"died": died, "tracker": open(os.path.join(root, layout.TRACKER)).read(),
              "iter2_exists": os.path.isdir(os.path.join(root, "iter_0000002"))}
    common = checkpointing.load_checkpoint(root, model, opt, sched)
    result["loaded_iteration"] = common["iteration"]
    result["consumed"] = common["consumed_train_samples"]
    now = checkpointing.unwrap(model[0]).state_dict()
    result["weights_restored"] = all(torch.equal(now[k], v) for k, v in saved.items())
    checkpointing.save_checkpoint(root, 2, model, opt, sched, {"consumed_train_samples": 4})
    result["tracker_after_retry"] = open(os.path.join(root, layout.TRACKER)).read()
    result["partial_left"] = [d for d in os.listdir(root) if d.endswith(".partial")]
    # a corrupt tracker is a one-line, named error
    with open(os.path.join(root, layout.TRACKER), "w") as f:
        f.write("garbage\n")
    try:
        checkpointing.load_checkpoint(root, model, opt, sched)
        result["corrupt_error"] = None
    except layout.CheckpointError as e:
        result["corrupt_error"] = str(e)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
