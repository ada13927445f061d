"""megatron_patch: model families, tokenizers, data builders, conversion and RLHF for megatron-core.

Importing this package applies the patch registry (``megatron_patch.patches``) once: the CPU platform
patches when no GPU is used, and the fixes for megatron-core bugs everywhere. Then it registers the
model families (``megatron_patch.models.registry``).
"""
import os as _os

# megatron-core compiles its jit fusions with torch.compile; on CPU the first call then costs tens of
# seconds of inductor C++ compilation for no gain. Users can opt back in by setting it to 0.
_os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

from megatron_patch import platform  # noqa: E402  (decides the device before megatron is imported)
from megatron_patch import patches as _patches  # noqa: E402

_patches.apply_stage("torch")
if not platform.use_cuda():
    import warnings as _warnings

    # Expected on CPU: megatron-core falls back to its torch implementations. Say it once, not 8x.
    for _msg in ("Transformer Engine and Apex are not installed", "Apex is not installed"):
        _warnings.filterwarnings("ignore", message=_msg)
import megatron.core  # noqa: E402,F401

_patches.apply_stage("megatron")

__version__ = "0.1.0"
