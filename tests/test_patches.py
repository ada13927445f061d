"""The patch registry: applied once, listed by ``python -m megatron_patch.patches``, documented,
warning once on an unchecked megatron-core version, and never editing megatron-core's files."""
import base64
import hashlib
import os
import subprocess
import sys
import warnings
from importlib.metadata import distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_lists_every_patch_applied_on_cpu():
    from megatron_patch import patches

    env = dict(os.environ, MEGATRON_PATCH_DEVICE="cpu")
    r = subprocess.run([sys.executable, "-m", "megatron_patch.patches"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "device: cpu" in lines[0] and "megatron-core 0.16" in lines[0]
    assert len(lines) == 2 + len(patches.REGISTRY)
    for p in patches.REGISTRY:
        row = next(line for line in lines if line.split()[0] == p.name)
        assert " applied " in row and p.reason[:40] in row and "0.16.1" in row, row


def test_apply_all_is_idempotent():
    import torch

    import megatron_patch  # noqa: F401
    from megatron_patch import patches

    calls = []
    for p in patches.REGISTRY:
        assert p.status == "applied", (p.name, p.status)
        fn = p.fn
        p.fn = (lambda f=fn, n=p.name: (calls.append(n), f()))
    before = torch.cuda.current_device
    try:
        patches.apply_all()
        patches.apply_all()
    finally:
        for p in patches.REGISTRY:
            p.fn = p.fn.__defaults__[0]
    assert calls == [] and torch.cuda.current_device is before


def test_unchecked_version_warns_once(monkeypatch):
    from megatron_patch import patches

    monkeypatch.setattr(patches, "megatron_core_version", lambda: "0.99.0")
    monkeypatch.setattr(patches, "_warned_version", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            patches._check_version()
    msgs = [str(w.message) for w in seen if "megatron-core" in str(w.message)]
    assert len(msgs) == 1 and "0.99.0" in msgs[0]


def test_skip_switch_and_docs():
    from megatron_patch import patches

    env = dict(os.environ, MEGATRON_PATCH_DEVICE="cpu", MEGATRON_PATCH_SKIP="cuda.nvtx")
    r = subprocess.run([sys.executable, "-m", "megatron_patch.patches"], capture_output=True,
                       text=True, env=env, timeout=300)
    row = next(line for line in r.stdout.splitlines() if line.startswith("cuda.nvtx "))
    assert "skipped (MEGATRON_PATCH_SKIP)" in row
    doc = open(os.path.join(ROOT, "docs", "cpu_platform.md"), encoding="utf-8").read()
    missing = [p.name for p in patches.REGISTRY if f"`{p.name}`" not in doc]
    assert not missing, f"docs/cpu_platform.md does not describe {missing}"


def test_megatron_core_files_are_untouched():
    """Patches replace attributes at import time; the installed files still match pip's RECORD."""
    import megatron_patch  # noqa: F401

    dist = distribution("megatron-core")
    checked = 0
    for f in dist.files:
        if not str(f).endswith(".py") or not f.hash:
            continue
        data = f.locate().read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.new(f.hash.mode, data).digest()).rstrip(b"=")
        assert digest.decode() == f.hash.value, f"{f} differs from the installed megatron-core"
        checked += 1
    assert checked > 100
