"""`python -m megatron_patch.patches`: list every patch, its target and whether it is applied."""
import megatron_patch  # noqa: F401  (applies the registry)
from megatron_patch import patches, platform

print(f"megatron-core {patches.megatron_core_version()}  device: {platform.device_type()}")
print(patches.table())
