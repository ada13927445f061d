"""Load one rank's part of a converted (or trained) legacy checkpoint into a built ``GPTModel`` stage.

Used by the comparison tool and the tests; training has its own checkpoint loader. Keys that carry
no weights (``_extra_state``) are ignored; any other missing or unexpected key is an error naming it.
"""
from __future__ import annotations

from typing import Optional

from megatron_patch.convert import layout, mg_io
from megatron_patch.convert.rules import ConversionError


def load_rank(model, root: str, *, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0,
              ep_size: int = 1, iteration: Optional[int] = None) -> None:
    if iteration is None:
        iteration = layout.read_tracker(root)
    path = mg_io.rank_path(root, iteration, tp_rank, pp_rank, pp_size, ep_rank, ep_size)
    sd = layout.safe_load(path)["model"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConversionError(f"{path} does not fit the model: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
