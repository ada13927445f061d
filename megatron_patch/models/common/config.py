"""HF ``config.json`` <-> megatron-core settings, driven by one table of field pairs per family.

A ``ConfigTable`` lists ``Field(hf, mg, where)`` pairs (``where`` is ``config`` for
``TransformerConfig`` fields, ``model`` for ``GPTModel`` arguments) plus ``Const`` values the family
always sets (RMSNorm, SwiGLU, ...). The same table converts both ways: ``to_megatron(hf_dict)`` gives a
``MegatronArch``; ``to_hf(arch)`` gives back the HF dict. Fields whose HF spelling varies between
transformers versions use ``get``/``put`` hooks.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, List, Optional

_MISSING = object()


@dataclasses.dataclass
class Field:
    hf: str
    mg: str
    where: str = "config"  # "config" -> TransformerConfig kwarg; "model" -> GPTModel kwarg
    default: Any = _MISSING  # used when the HF config lacks the key
    get: Optional[Callable[[dict], Any]] = None  # custom reader of the HF dict
    put: Optional[Callable[[dict, Any], None]] = None  # custom writer into the HF dict


@dataclasses.dataclass
class Const:
    mg: str
    value: Any
    where: str = "config"


@dataclasses.dataclass
class MegatronArch:
    """Everything needed to build the megatron model of one architecture."""

    family: str
    config: Dict[str, Any]  # TransformerConfig kwargs (architecture only)
    model: Dict[str, Any]  # GPTModel kwargs (vocab_size, max_sequence_length, rope ...)
    hf_config: Dict[str, Any]  # the HF config.json this came from (round-trips unknown keys)
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # family-specific switches


class ConfigTable:
    def __init__(self, family: str, fields: List[Field], consts: List[Const],
                 hf_defaults: Optional[dict] = None,
                 finish: Optional[Callable[[dict, MegatronArch], None]] = None,
                 class_defaults: Optional[dict] = None):
        self.family = family
        self.fields = fields
        self.consts = consts
        self.hf_defaults = hf_defaults or {}
        self.finish = finish  # family hook: derived values (kv_channels, rope scaling, ...)
        # what the family's transformers config class takes for a key config.json leaves out
        # (``save_pretrained`` writes every key, a hand-written config.json may not): read as
        # transformers reads it, e.g. MistralConfig's num_key_value_heads=8, sliding_window=4096
        self.class_defaults = class_defaults or {}

    def to_megatron(self, hf: dict) -> MegatronArch:
        arch = MegatronArch(self.family, {}, {}, copy.deepcopy(hf))
        hf = {**self.class_defaults, **hf}  # a key that is present (even null) is the config's
        for c in self.consts:
            (arch.config if c.where == "config" else arch.model)[c.mg] = c.value
        for f in self.fields:
            if f.get is not None:
                value = f.get(hf)
            elif f.hf in hf and hf[f.hf] is not None:
                value = hf[f.hf]
            elif f.default is not _MISSING:
                value = f.default
            else:
                raise KeyError(f"{self.family} config.json lacks required field {f.hf!r}")
            if value is _MISSING:
                continue
            (arch.config if f.where == "config" else arch.model)[f.mg] = value
        if self.finish is not None:
            self.finish(hf, arch)
        return arch

    def to_hf(self, arch: MegatronArch) -> dict:
        hf = copy.deepcopy(arch.hf_config) if arch.hf_config else dict(self.hf_defaults)
        for f in self.fields:
            src = arch.config if f.where == "config" else arch.model
            if f.mg not in src:
                continue
            if f.put is not None:
                f.put(hf, src[f.mg])
            else:
                hf[f.hf] = src[f.mg]
        return hf


def rope_theta_get(hf: dict, default: float = 10000.0):
    """rope_theta lives top-level in older configs and in rope_parameters in transformers 5."""
    params = hf.get("rope_parameters") or {}
    if "rope_theta" in params:
        return params["rope_theta"]
    return hf.get("rope_theta", default)


def rope_theta_put(hf: dict, value) -> None:
    if isinstance(hf.get("rope_parameters"), dict):
        hf["rope_parameters"]["rope_theta"] = value
    else:
        hf["rope_theta"] = value


def rope_scaling_of(hf: dict) -> Optional[dict]:
    """The rope scaling dict of an HF config (``rope_scaling`` or transformers 5 ``rope_parameters``),
    or None for plain RoPE."""
    rs = hf.get("rope_scaling") or hf.get("rope_parameters") or None
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return None
    return rs
