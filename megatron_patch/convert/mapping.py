"""Declarative HF <-> Megatron weight-name tables.

A family's mapping is a list of ``Row(hf, mg, rule)``: the HF name(s), the Megatron name and the
sharding rule (``megatron_patch.convert.rules``). Names carry wildcards: ``{i}`` is the layer index
(global on the HF side, local to the pipeline stage on the Megatron side) and ``{e}`` the expert index
(global on the HF side, local to the expert-parallel rank on the Megatron side). A row whose rule fuses
several HF tensors (``qkv``, ``gated``) lists them in order.

``Mapping(rows_fn)`` wraps a function ``arch -> [Row]`` so that a family can pick rows by
architecture switches (biases, tied embeddings, Falcon's variants). The engine expands rows per
layer/expert; both directions come from this one table.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Tuple, Union

from megatron_patch.convert.rules import Rule

# Megatron names that live on the first / last pipeline stage (everything with {i} follows its layer)
FIRST_STAGE_PREFIXES = ("embedding.",)
LAST_STAGE_PREFIXES = ("decoder.final_layernorm.", "output_layer.", "rm_head.")


@dataclasses.dataclass(frozen=True)
class Row:
    hf: Tuple[str, ...]
    mg: str
    rule: Rule

    def __init__(self, hf: Union[str, Sequence[str]], mg: str, rule: Rule):
        hf = (hf,) if isinstance(hf, str) else tuple(hf)
        if len(hf) != rule.arity:
            raise ValueError(f"rule {rule} takes {rule.arity} HF tensors, row {mg} lists {len(hf)}")
        object.__setattr__(self, "hf", hf)
        object.__setattr__(self, "mg", mg)
        object.__setattr__(self, "rule", rule)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mg

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.mg

    def stage(self) -> str:
        """'layer', 'first' or 'last': where a non-layer row lives in a pipeline."""
        if self.per_layer:
            return "layer"
        if self.mg.startswith(FIRST_STAGE_PREFIXES):
            return "first"
        if self.mg.startswith(LAST_STAGE_PREFIXES):
            return "last"
        raise ValueError(f"cannot place Megatron key {self.mg!r} on a pipeline stage")


@dataclasses.dataclass
class Bound:
    """A row with its wildcards filled in."""

    row: Row
    hf: Tuple[str, ...]
    mg: str  # with the stage-local layer index and EP-local expert index
    layer: Optional[int] = None  # global layer
    expert: Optional[int] = None  # global expert

    @property
    def rule(self) -> Rule:
        return self.row.rule


def bind(row: Row, layer: Optional[int] = None, local_layer: Optional[int] = None,
         expert: Optional[int] = None, local_expert: Optional[int] = None) -> Bound:
    hf = tuple(n.format(i=layer, e=expert) if ("{" in n) else n for n in row.hf)
    mg = row.mg.format(i=local_layer, e=local_expert) if "{" in row.mg else row.mg
    return Bound(row, hf, mg, layer, expert)


class Mapping:
    """A family's weight-name table: ``rows(arch)`` plus HF names that may be present and ignored."""

    def __init__(self, rows_fn: Callable[[object], List[Row]],
                 ignore_hf: Sequence[str] = ("rotary_emb.inv_freq",)):
        self.rows_fn = rows_fn
        self.ignore_hf = tuple(ignore_hf)  # suffixes of HF keys that carry no weights

    def rows(self, arch) -> List[Row]:
        rows = self.rows_fn(arch)
        seen = set()
        for r in rows:
            if r.mg in seen:
                raise ValueError(f"mapping lists Megatron key {r.mg} twice")
            seen.add(r.mg)
        return rows

    def ignorable(self, hf_name: str) -> bool:
        return hf_name.endswith(self.ignore_hf)
