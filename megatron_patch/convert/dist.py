"""megatron-core ``torch_dist`` checkpoints -> the legacy layout the conversion engine streams from.

A ``torch_dist`` checkpoint stores every tensor once, in its global (unsharded) shape, with
megatron-core's own conventions (stacked layers, gate/up split into halves, ...). Rather than
re-implementing those conventions, this loads the checkpoint through megatron-core itself: a world of
one process builds the model at TP=PP=EP=1 and lets ``dist_checkpointing.load`` reshard into it,
then writes the state dict as a TP=1 legacy checkpoint. The engine then converts or reshards from
there as from any legacy checkpoint. This step holds the whole model in memory once (unlike the
streaming legacy paths) and runs in a child process, so it works from processes that already use
torch.distributed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

from megatron_patch.convert import layout
from megatron_patch.convert.rules import ConversionError


def is_torch_dist(root: str, iteration=None) -> bool:
    try:
        it = layout.read_tracker(root) if iteration is None else (
            None if iteration == "release" else int(iteration))
    except layout.CheckpointError:
        return False
    d = os.path.join(root, layout.iter_dirname(it))
    return os.path.isfile(os.path.join(d, "metadata.json")) and \
        os.path.isfile(os.path.join(d, ".metadata"))


def _global_shape(ckpt_dir: str, key: str):
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(ckpt_dir).read_metadata()
    entry = md.state_dict_metadata.get(key)
    return None if entry is None else tuple(entry.size)


def _convert_in_this_process(root: str, target: str, iteration: Optional[str]) -> None:
    import megatron_patch  # noqa: F401  (patches before megatron is used)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_patch import platform
    from megatron_patch.convert import mg_io
    from megatron_patch.convert.engine import family_and_arch
    from megatron_patch.models.builder import build_gpt_model, transformer_config

    meta = layout.read_meta(root)
    hf_config = meta.get("hf_config") or layout.read_hf_config(root)
    if not hf_config:
        raise ConversionError(f"{root} carries no HF config: cannot tell the architecture")
    fam, arch = family_and_arch(hf_config, meta.get("family"))
    it = layout.read_tracker(root) if iteration is None else (
        None if iteration == "release" else int(iteration))
    d = os.path.join(root, layout.iter_dirname(it))
    shape = _global_shape(d, "embedding.word_embeddings.weight")
    padded = shape[0] if shape else int(meta.get("padded_vocab_size") or arch.model["vocab_size"])
    platform.init_process_group()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(arch, transformer_config(arch), vocab_size=padded, pre_process=True,
                            post_process=True)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, d)
    missing, unexpected = model.load_state_dict(loaded["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise ConversionError(f"{d}: the torch_dist checkpoint lacks {missing[:10]}")
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if arch.model.get("share_embeddings_and_output_weights"):
        sd.pop("output_layer.weight", None)
    mg_io.save_rank(mg_io.rank_path(target, it, 0, 0, 1), sd, iteration=it or 0)
    layout.write_tracker(target, it)
    new_meta = dict(meta)
    new_meta.update(family=fam.name, format="legacy", tensor_model_parallel_size=1,
                    pipeline_model_parallel_size=1, expert_model_parallel_size=1,
                    padded_vocab_size=padded, hf_config=hf_config,
                    original_vocab_size=int(meta.get("original_vocab_size")
                                            or hf_config.get("vocab_size") or padded),
                    converted_from="torch_dist")
    layout.write_meta(target, new_meta)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


def torch_dist_to_legacy(root: str, target: str, iteration: Optional[str] = None) -> None:
    """Write a TP=1 legacy copy of the torch_dist checkpoint at ``root`` into ``target`` (run in a
    child process: it needs a torch.distributed world of its own)."""
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    env.pop("MASTER_PORT", None)
    r = subprocess.run([sys.executable, "-m", "megatron_patch.convert.dist", root, target,
                        iteration or ""], capture_output=True, text=True, env=env)
    if r.returncode:
        raise ConversionError(f"cannot read the torch_dist checkpoint {root}:\n{r.stderr[-3000:]}")


if __name__ == "__main__":
    try:
        _convert_in_this_process(sys.argv[1], sys.argv[2], sys.argv[3] or None)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
