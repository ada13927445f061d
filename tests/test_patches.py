"""The patch registry: applied once, listed by ``python -m megatron_patch.patches``, documented,
warning once on an unchecked megatron-core version, and never editing megatron-core's files."""
import base64
import hashlib
import os
import subprocess
import sys
import warnings
from importlib.metadata import distribution

import pytest

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


def test_patch_that_finds_nothing_to_change_is_not_reported_applied(monkeypatch):
    """With TE/Apex installed two bug patches return early; the table said "applied" for them."""
    import megatron_patch  # noqa: F401
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.transformer.moe import moe_utils

    from megatron_patch import patches

    by_name = {p.name: p for p in patches.REGISTRY}
    adam, gemm = by_name["distopt.torch_adam_step"], by_name["moe.te_general_gemm"]
    cls = distrib_optimizer.DistributedOptimizer
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(moe_utils, "te_general_gemm", object(), raising=False)
    monkeypatch.setattr(cls, "load_state_dict", cls.load_state_dict)  # restored after the test
    monkeypatch.setattr(cls, "_set_main_param_and_optimizer_states",
                        cls._set_main_param_and_optimizer_states)
    for p in (adam, gemm):
        monkeypatch.setattr(p, "status", "pending")
    before = cls.load_state_dict
    patches.apply_stage("megatron")
    assert adam.status == "not needed here (fused Adam of TE/Apex in use)", adam.status
    assert gemm.status == "not needed here (Transformer Engine defines it)", gemm.status
    assert cls.load_state_dict is before
    assert all(p.status == "applied" for p in patches.REGISTRY if p not in (adam, gemm))


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


def test_dataset_index_cache_is_complete_or_absent(tmp_path, monkeypatch):
    """A GPTDataset build that dies while writing its index cache (a killed job, a full disk)
    leaves no partial .npy behind (``datasets.atomic_index_cache``): the next build builds again
    and serves the same samples as a clean build. Without the patch (megatron-core's in-place
    numpy.save) the truncated file stays and the next build fails loading it."""
    import types

    import numpy as np
    import torch

    import megatron_patch  # noqa: F401
    from megatron.core.datasets import gpt_dataset
    from megatron.core.datasets.blended_megatron_dataset_builder import \
        BlendedMegatronDatasetBuilder
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "docs")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(60):
        n = int(rng.integers(5, 40))
        builder.add_document(torch.from_numpy(rng.integers(3, 100, n).astype(np.int32)), [n])
    builder.finalize(prefix + ".idx")
    tok = types.SimpleNamespace(eod=0, pad=1, vocab_size=100,
                                unique_identifiers={"class": "test", "vocab_size": 100})

    def build(cache):
        cfg = gpt_dataset.GPTDatasetConfig(
            random_seed=7, sequence_length=16, blend=([prefix], None), split="100,0,0",
            path_to_cache=str(cache), tokenizer=tok, reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, mmap_bin_files=True)
        return BlendedMegatronDatasetBuilder(gpt_dataset.GPTDataset, [40, None, None],
                                             lambda: True, cfg).build()[0]

    reference = build(tmp_path / "clean")
    write_array = np.lib.format.write_array

    def dies_on_the_shuffle_index(fp, array, *args, **kwargs):
        if array.ndim == 1 and len(array) == len(reference):  # the last of the three files
            fp.write(b"\x93NUMPY")  # what a killed writer leaves: the start of the file
            raise OSError("No space left on device")
        return write_array(fp, array, *args, **kwargs)

    def crash_then_rebuild(cache):
        with monkeypatch.context() as m:
            m.setattr(np.lib.format, "write_array", dies_on_the_shuffle_index)
            # (with torch.distributed initialised, megatron-core re-raises it as an Exception)
            with pytest.raises(Exception) as e:
                build(cache)
        assert any(isinstance(x, OSError) and "No space left" in str(x)
                   for x in (e.value, e.value.__cause__)), repr(e.value)
        return build(cache)

    assert isinstance(gpt_dataset.numpy, types.ModuleType) and gpt_dataset.numpy is not np
    again = crash_then_rebuild(tmp_path / "patched")
    left = sorted(os.listdir(tmp_path / "patched"))
    assert not [f for f in left if ".tmp-" in f], left
    assert len(again) == len(reference)
    for i in (0, 7, len(reference) - 1):
        assert torch.equal(again[i]["tokens"], reference[i]["tokens"])
    # megatron-core's own in-place writes: the partial file is taken for a finished cache
    monkeypatch.setattr(gpt_dataset, "numpy", np)
    with pytest.raises((EOFError, ValueError)) as e:
        crash_then_rebuild(tmp_path / "unpatched")
    print(f"without the patch the rebuild fails: {e.value!r}")


def test_rng_tracker_states_are_seeded_per_rank():
    """megatron-core seeds its tracked RNG streams with ``torch.cuda.manual_seed`` (the
    model-parallel stream: seed + 2718 + TP rank, used by the attention dropout in TP regions). The
    CPU patch made that a no-op, so every stream was a copy of the CPU generator's state at seeding
    time: the same on every TP rank and the same numbers as the default stream. On a GPU the same
    checks hold for the CUDA generator (no patch there)."""
    import torch

    import megatron_patch  # noqa: F401
    from megatron.core.tensor_parallel import random as mr

    from megatron_patch import platform

    device = "cuda" if platform.use_cuda() else "cpu"  # the generator the tracker drives

    def seeded(seed):  # a generator of that device seeded with ``seed``, as a state
        return torch.Generator(device=device).manual_seed(seed).get_state()

    saved = torch.cuda.get_rng_state()  # (the CPU generator's on the CPU platform)
    tracker_before = mr._CUDA_RNG_STATE_TRACKER, mr._CUDA_RNG_STATE_TRACKER_INITIALIZED
    try:
        states = {}
        for tp_rank in (0, 1):
            torch.cuda.set_rng_state(seeded(99))  # whatever the generator holds
            mr.model_parallel_cuda_manual_seed(7, tp_rank=tp_rank, ep_rank=0, etp_rank=0,
                                               force_reset_rng=True)
            states[tp_rank] = mr.get_cuda_rng_tracker().get_states()
            # the data-parallel (default) stream is seeded with the seed itself
            assert torch.equal(torch.cuda.get_rng_state(), seeded(7))
        for tp_rank in (0, 1):
            assert torch.equal(states[tp_rank]["model-parallel-rng"], seeded(7 + 2718 + tp_rank))
            assert torch.equal(states[tp_rank]["data-parallel-rng"], seeded(7))
        assert not torch.equal(states[0]["model-parallel-rng"], states[1]["model-parallel-rng"])
    finally:
        mr._CUDA_RNG_STATE_TRACKER, mr._CUDA_RNG_STATE_TRACKER_INITIALIZED = tracker_before
        torch.cuda.set_rng_state(saved)

@pytest.mark.parametrize("family", ["llama", "bloom", "qwen2", "mixtral"])
def test_tp_fast_paths_give_megatron_cores_numbers(family):
    """``tp.native_linear`` and ``tp.one_rank_mappings`` (speed: C++ autograd nodes instead of
    megatron-core's Python ones) must not change a bit: a TP=1 model's logits and every parameter's
    gradient equal what megatron-core's own linear autograd function and mappings give, on the
    families with and without linear biases (Bloom: all of them, Qwen2: QKV) and with MoE experts."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import layers, model_parallel_cuda_manual_seed

    import megatron_patch  # noqa: F401
    from megatron_patch import patches, platform
    from megatron_patch.models import builder
    from megatron_patch.models.registry import get_family

    names = ("linear_with_grad_accumulation_and_async_allreduce",
             "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region")
    status = {p.name: p.status for p in patches.REGISTRY}
    assert status["tp.native_linear"] == status["tp.one_rank_mappings"] == "applied"
    patched = {n: getattr(layers, n) for n in names}
    assert all(getattr(f, "__wrapped__", None) is not None for f in patched.values())

    platform.init_process_group()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1)
    arch = builder.arch_from_hf(get_family(family).preset("tiny"))
    model_parallel_cuda_manual_seed(5)
    torch.manual_seed(5)
    model = builder.build_gpt_model(arch, builder.transformer_config(arch), use_te=False)
    with torch.no_grad():  # non-zero biases (megatron-core initialises them to zero)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ids = torch.randint(0, model.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(11).expand(3, 11)
    weights = torch.randn(3, 11, model.vocab_size, generator=torch.Generator().manual_seed(2))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(ids, pos, attention_mask=None)
        (logits * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    fast = run()
    nodes = _python_autograd_nodes(model, ids, pos)
    try:
        for n in names:
            setattr(layers, n, patched[n].__wrapped__)
        slow = run()
        slow_nodes = _python_autograd_nodes(model, ids, pos)
    finally:
        for n in names:
            setattr(layers, n, patched[n])
    assert torch.equal(fast[0], slow[0])
    assert fast[1].keys() == slow[1].keys() and len(fast[1]) == len(list(model.parameters()))
    for n in fast[1]:
        assert torch.equal(fast[1][n], slow[1][n]), n
    # the point of the patches: megatron-core's Python nodes for linears and mappings are gone
    assert slow_nodes > 0 and nodes == 0, (nodes, slow_nodes)


def _python_autograd_nodes(model, ids, pos) -> int:
    """How many nodes of the logits' autograd graph are megatron-core linear/mapping Functions."""
    seen, stack, count = set(), [model(ids, pos, attention_mask=None).grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kind = type(fn).__name__
        count += kind.startswith(("LinearWithGradAccumulation", "_CopyToModelParallel",
                                  "_ReduceFromModelParallel"))
        stack.extend(f for f, _ in fn.next_functions)
    return count


def test_cuda_type_names_only_inside_the_wrapped_optimizer_functions():
    """``typenames.optimizer``: megatron-core's dtype checks see 'torch.cuda.FloatTensor' for CPU
    tensors inside the three wrapped functions only (not before, after, in a nested call's caller
    after it returns, or on another thread), and the checks still reject a float64 gradient."""
    import threading

    import torch

    import megatron_patch  # noqa: F401
    from megatron.core.optimizer import optimizer

    from megatron_patch.patches import cpu

    seen = {}

    def inner():
        seen["inner"] = torch.ones(1).type()

    def outer():
        cpu._with_cuda_type_names(inner)()
        seen["outer"] = torch.ones(1, dtype=torch.bfloat16).type()
        t = threading.Thread(target=lambda: seen.setdefault("thread", torch.ones(1).type()))
        t.start()
        t.join()
        seen["converted"] = torch.ones(1).type(torch.float64).dtype

    cpu._with_cuda_type_names(outer)()
    assert seen == {"inner": "torch.cuda.FloatTensor", "outer": "torch.cuda.BFloat16Tensor",
                    "thread": "torch.FloatTensor", "converted": torch.float64}
    assert torch.ones(1).type() == "torch.FloatTensor"
    good = torch.nn.Parameter(torch.ones(3))
    good.grad = torch.full((3,), 2.0)
    optimizer.clip_grad_by_total_norm_fp32([good], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(good.grad, torch.full((3,), 0.5))  # scaled by 1 / 4
    bad = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    bad.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AssertionError):
        optimizer.clip_grad_by_total_norm_fp32([bad], max_norm=1.0, total_norm=0.5)
    assert torch.ones(1).type() == "torch.FloatTensor"  # reset after the raise too
