"""The family registry: ``register_family`` / ``get_family`` / ``family_for_hf_config``.

A family bundles what makes an architecture: the HF ``config.json`` <-> megatron table
(``config.py``), the layer ``ModuleSpec`` (``spec.py``), the HF <-> megatron weight-name table
(``mapping.py``) and named size presets (HF config dicts, ``tiny`` among them).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Dict, List, Optional, Sequence

_FAMILIES: Dict[str, "Family"] = {}
# Families register on import of their package; these are imported lazily by get_family.
BUILTIN = ("llama", "qwen2", "mistral", "mixtral", "bloom", "falcon", "glm", "galactica")


@dataclasses.dataclass
class Family:
    name: str
    hf_architectures: Sequence[str]  # e.g. ("LlamaForCausalLM",)
    hf_model_types: Sequence[str]  # config.json "model_type" values
    config_table: object  # megatron_patch.models.common.config.ConfigTable
    layer_spec: Callable  # (MegatronArch, use_te: bool) -> ModuleSpec
    presets: Dict[str, dict]  # name -> HF config dict
    mapping: Optional[object] = None  # megatron_patch.convert mapping table (issue #4)
    post_build: Optional[Callable] = None  # (model, MegatronArch) -> None, model-level fix-ups
    default_tokenizer: Optional[str] = None  # TOKENIZER key (llamabpe, bloombpe, ...)

    def preset(self, size: str) -> dict:
        key = size.lower()
        for name, cfg in self.presets.items():
            if name.lower() == key:
                return dict(cfg)
        raise KeyError(f"family {self.name} has no size preset {size!r}; "
                       f"known: {', '.join(self.presets)} (or 'auto' to read the checkpoint)")


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def _load_builtin(name: str) -> None:
    if name in BUILTIN and name not in _FAMILIES:
        try:
            importlib.import_module(f"megatron_patch.models.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"megatron_patch.models.{name}":
                raise


def get_family(name: str) -> Family:
    _load_builtin(name.lower())
    try:
        return _FAMILIES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(families())}") from None


def families() -> List[str]:
    for n in BUILTIN:
        _load_builtin(n)
    return sorted(_FAMILIES)


def family_for_hf_config(hf_config: dict) -> Family:
    """Find the family of an HF config.json (by architectures, then model_type)."""
    archs = hf_config.get("architectures") or []
    mtype = hf_config.get("model_type")
    for n in families():
        f = _FAMILIES[n]
        if any(a in f.hf_architectures for a in archs):
            return f
    for n in families():
        f = _FAMILIES[n]
        if mtype in f.hf_model_types:
            return f
    raise ValueError(f"unknown architecture {archs or mtype!r}: no registered family "
                     f"({', '.join(families())}) matches this config.json")
