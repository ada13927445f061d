"""Galactica / OPT model fix-up: the learned position table with OPT's offset of 2 rows."""
from __future__ import annotations

from megatron_patch.models.common.embedding import add_position_offset


def post_build(model, arch) -> None:
    add_position_offset(model, arch.extra.get("position_offset", 2))
