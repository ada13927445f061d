"""The patch registry: every change we make to megatron-core (or to torch on its behalf) lives here.

Each patch is one small named function with the attribute it targets, the reason, the megatron-core
versions it was checked against and the condition under which it applies (CPU only, or always for
megatron-core bugs). A patch function returns None when it changed its target, or a short reason
when it found nothing to change on this installation (the table shows "not needed here" and the
reason). ``apply_all()`` runs them once (idempotent); ``python -m megatron_patch.patches`` prints
the table. No patch rewrites Megatron source text: patches replace attributes only.

``MEGATRON_PATCH_SKIP=name1,name2`` switches patches off (to show that a patch is needed).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Callable, List, Optional

from megatron_patch import platform

logger = logging.getLogger(__name__)

CHECKED_VERSIONS = ("0.16.0", "0.16.1")


@dataclasses.dataclass
class Patch:
    name: str
    target: str
    reason: str
    stage: str  # "torch": before megatron is imported; "megatron": after
    when: str  # "cpu": only without CUDA; "always": megatron-core bugs that hit every device
    fn: Callable[[], None]
    versions: tuple = CHECKED_VERSIONS
    status: str = "pending"

    def wanted(self) -> bool:
        if self.name in _skipped():
            return False
        return self.when == "always" or (self.when == "cpu" and not platform.use_cuda())


REGISTRY: List[Patch] = []
_warned_version = False


def _skipped() -> set:
    return {s.strip() for s in os.environ.get("MEGATRON_PATCH_SKIP", "").split(",") if s.strip()}


def register(name: str, target: str, reason: str, stage: str, when: str,
             versions: tuple = CHECKED_VERSIONS):
    """Decorator: add a patch function to the registry."""
    if stage not in ("torch", "megatron") or when not in ("cpu", "always"):
        raise ValueError(f"bad patch declaration {name}: stage={stage} when={when}")

    def deco(fn):
        if any(p.name == name for p in REGISTRY):
            raise ValueError(f"duplicate patch name {name}")
        REGISTRY.append(Patch(name, target, reason, stage, when, fn, versions))
        return fn

    return deco


def megatron_core_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # not installed as a distribution (a source checkout on PYTHONPATH)
        try:
            from megatron.core import package_info

            return package_info.__version__
        except Exception:
            return None


def _check_version() -> None:
    global _warned_version
    v = megatron_core_version()
    if v not in CHECKED_VERSIONS and not _warned_version:
        _warned_version = True
        warnings.warn(
            f"megatron_patch was checked against megatron-core {', '.join(CHECKED_VERSIONS)}; "
            f"found {v}. Patches are applied anyway; report problems with this version.",
            stacklevel=3,
        )


def apply_stage(stage: str) -> None:
    if stage == "megatron":
        _check_version()
    for p in REGISTRY:
        if p.stage != stage or p.status == "applied":
            continue
        if not p.wanted():
            p.status = "skipped (MEGATRON_PATCH_SKIP)" if p.name in _skipped() else "not needed here"
            continue
        try:
            why_not = p.fn()
        except AttributeError as e:  # target moved in another megatron-core version
            p.status = f"failed: {e}"
            warnings.warn(f"patch {p.name} could not be applied: {e}")
            continue
        # a patch function returns a reason when it finds nothing to change here (e.g. TE present)
        p.status = "applied" if why_not is None else f"not needed here ({why_not})"


def apply_all() -> None:
    """Apply every wanted patch once. Safe to call many times."""
    apply_stage("torch")
    apply_stage("megatron")


def table() -> str:
    rows = [("name", "target", "when", "checked on", "status", "reason")]
    for p in REGISTRY:
        rows.append((p.name, p.target, p.when, ",".join(p.versions), p.status, p.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    out = []
    for r in rows:
        out.append("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
    return "\n".join(out)


# The patch definitions register themselves on import.
from megatron_patch.patches import cpu as _cpu  # noqa: E402,F401
from megatron_patch.patches import bugs as _bugs  # noqa: E402,F401
