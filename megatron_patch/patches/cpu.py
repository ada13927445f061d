"""CPU platform patches: route megatron-core's hard-coded CUDA calls to the CPU when no GPU is used.

torch-level patches replace ``torch.cuda.*`` functions that can only raise on a CPU-only process, so
they cannot break code that works today. megatron-level patches are narrow: a module-local ``torch``
proxy for modules that build tensors with ``device="cuda"``, CPU RNG state for the RNG tracker, and
CUDA type names inside three dtype checks. A few patches are for speed only and change no number
(one-rank collectives, megatron-core's linear and TP mappings where they communicate nothing, the
async checkpoint writer's queue). See docs/cpu_platform.md for the evidence behind each.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import threading
import types

import torch

from megatron_patch.patches import register

# --------------------------------------------------------------------------------------------------
# torch level (before megatron-core is imported)
# --------------------------------------------------------------------------------------------------


_IDENTITY_OPS = ("SUM", "AVG", "MAX", "MIN", "PRODUCT", "BAND", "BOR", "BXOR")


@register("dist.one_rank_collectives", "torch.distributed.all_reduce/broadcast",
          "speed: gloo runs every collective through its worker thread (0.1-0.25 ms), also on "
          "one-rank groups, where a synchronous all_reduce or broadcast leaves the tensor as it is; "
          "megatron-core issues 4 per training step at DP = PP = TP = 1",
          stage="torch", when="cpu")
def _one_rank_collectives():
    import torch.distributed as dist

    identity = {getattr(dist.ReduceOp, n) for n in _IDENTITY_OPS if hasattr(dist.ReduceOp, n)}
    all_reduce, broadcast = dist.all_reduce, dist.broadcast

    def one_rank(group) -> bool:
        return dist.is_initialized() and dist.get_world_size(group) == 1

    @functools.wraps(all_reduce)
    def all_reduce_(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not async_op and op in identity and one_rank(group):
            return None  # the sum (mean, max, ...) over one rank is its own tensor
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    @functools.wraps(broadcast)
    def broadcast_(tensor, src=None, group=None, async_op=False, group_src=None):
        if not async_op and one_rank(group):
            return None  # the only rank is the source
        return broadcast(tensor, src=src, group=group, async_op=async_op, group_src=group_src)

    dist.all_reduce, dist.broadcast = all_reduce_, broadcast_


@register("cuda.current_device", "torch.cuda.current_device/is_available",
          "~175 megatron-core sites pass device=torch.cuda.current_device() (RoPE, init, p2p)",
          stage="torch", when="cpu")
def _cuda_current_device():
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.is_available = lambda: False  # hidden GPUs must stay hidden (MEGATRON_PATCH_DEVICE=cpu)


@register("cuda.rng", "torch.cuda.get_rng_state/set_rng_state/manual_seed(_all)",
          "CudaRNGStatesTracker and model_parallel_cuda_manual_seed seed the CUDA generator",
          stage="torch", when="cpu")
def _cuda_rng():
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # the CPU generator plays the CUDA one (as for get/set above): megatron-core's RNG tracker
    # seeds each stream with torch.cuda.manual_seed between a get and a set of the state (a no-op
    # here made every stream a copy of the generator: the same on every TP rank)
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = torch.cuda.manual_seed


@register("cuda.synchronize", "torch.cuda.synchronize",
          "p2p communication (batch_p2p_sync), DDP, timers and checkpointing synchronise the GPU",
          stage="torch", when="cpu")
def _cuda_synchronize():
    torch.cuda.synchronize = lambda device=None: None


class _NoopEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return None

    def synchronize(self):
        return None

    def wait(self, stream=None):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoopStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event or _NoopEvent()

    def synchronize(self):
        return None

    def query(self):
        return True


@register("cuda.streams", "torch.cuda.Stream/Event/current_stream/default_stream/stream",
          "the MoE alltoall dispatcher builds a side stream and synchronises on its events",
          stage="torch", when="cpu")
def _cuda_streams():
    torch.cuda.Stream = _NoopStream
    torch.cuda.Event = _NoopEvent
    _default = _NoopStream()
    torch.cuda.current_stream = lambda device=None: _default
    torch.cuda.default_stream = lambda device=None: _default
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()


@register("tensor.cuda", "torch.Tensor.cuda",
          "explicit .cuda() calls in the distributed optimizer's dp-zero gather and tensor_parallel.data",
          stage="torch", when="cpu")
def _tensor_cuda():
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


@register("cuda.nvtx", "torch.cuda.nvtx.range_push/range_pop/mark/range",
          "NVTX markers in inference and timers", stage="torch", when="cpu")
def _cuda_nvtx():
    nvtx = torch.cuda.nvtx
    nvtx.range_push = lambda *a, **k: None
    nvtx.range_pop = lambda *a, **k: None
    nvtx.mark = lambda *a, **k: None
    nvtx.range = lambda *a, **k: contextlib.nullcontext()


@register("cuda.memory_stats", "torch.cuda.memory_allocated/max_memory_allocated/memory_reserved/empty_cache",
          "memory reporting and cache release in training and inference loops",
          stage="torch", when="cpu")
def _cuda_memory():
    torch.cuda.memory_allocated = lambda device=None: 0
    torch.cuda.max_memory_allocated = lambda device=None: 0
    torch.cuda.memory_reserved = lambda device=None: 0
    torch.cuda.empty_cache = lambda: None


# --------------------------------------------------------------------------------------------------
# megatron level
# --------------------------------------------------------------------------------------------------


@register("rng.tracker_state",
          "megatron.core.tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state",
          "CudaRNGStatesTracker.fork swaps the CUDA generator; on CPU the CPU generator plays it",
          stage="megatron", when="cpu")
def _rng_tracker_state():
    from megatron.core.tensor_parallel import random as mr

    mr._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mr._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    # fork() warns "CPU RNG state changed within GPU RNG context" on every call: expected here.
    logging.getLogger(mr.__name__).setLevel(logging.ERROR)


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
              "as_tensor", "triu", "tril")


def _cpu_kwargs(kwargs):
    dev = kwargs.get("device")
    if dev is not None and "cuda" in str(dev):
        kwargs["device"] = "cpu"
    kwargs.pop("pin_memory", None)
    return kwargs


class _TorchCpuProxy(types.ModuleType):
    """A stand-in for the ``torch`` module inside one megatron-core module: tensor factories called
    with ``device="cuda"`` build on the CPU; everything else is torch itself."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            real = getattr(torch, name)
            setattr(self, name, self._wrap(real))

    @staticmethod
    def _wrap(real):
        @functools.wraps(real)
        def factory(*args, **kwargs):
            return real(*args, **_cpu_kwargs(kwargs))

        return factory

    def __getattr__(self, name):
        return getattr(torch, name)


_SHIMMED = (
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens = torch.zeros(..., device="cuda")
    "megatron.core.optimizer.optimizer",  # found_inf, _scale, _dummy_overflow_buf
    "megatron.core.optimizer.clip_grads",  # grad norm and zero-count buffers
    "megatron.core.utils",  # local_multi_tensor_l2_norm (no-Apex/TE grad-norm fallback)
    "megatron.core.transformer.utils",  # get_default_causal_mask (inference prefill)
    "megatron.core.tensor_parallel.data",  # broadcast_data size buffers
    "megatron.core.inference.text_generation_controllers.text_generation_controller",
)


@register("shim.cuda_factories", ", ".join(".".join(m.split(".")[-2:]) + ".torch" for m in _SHIMMED),
          "these modules build tensors with device='cuda' (and pin_memory); a module-local torch "
          "proxy builds them on the CPU", stage="megatron", when="cpu")
def _shim_cuda_factories():
    proxy = _TorchCpuProxy()
    for mod_name in _SHIMMED:
        mod = importlib.import_module(mod_name)
        if getattr(mod, "torch", None) is None:
            raise AttributeError(f"{mod_name} has no module global 'torch'")
        mod.torch = proxy


_TYPE_NAMES = threading.local()  # .cuda: inside a wrapped function on this thread


def _tensor_type_with_cuda_names(tensor_type):
    """``Tensor.type`` whose no-argument form answers 'torch.cuda.*Tensor' for CPU tensors while
    the calling thread is inside a ``_with_cuda_type_names`` function (everything else, and other
    threads, get torch's answer). A flag instead of a ``TorchFunctionMode``: a mode runs Python for
    every torch call in its scope (~200 us for the 15 parameters of a tiny model's
    ``clip_grad_by_total_norm_fp32``, once per training step), the flag only for ``.type()``."""

    @functools.wraps(tensor_type)
    def type_(self, *args, **kwargs):
        if args or kwargs or not getattr(_TYPE_NAMES, "cuda", False):
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    type_.__megatron_patch_wrapped__ = True
    return type_


def _with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        outer = getattr(_TYPE_NAMES, "cuda", False)
        _TYPE_NAMES.cuda = True
        try:
            return fn(*args, **kwargs)
        finally:
            _TYPE_NAMES.cuda = outer

    wrapper.__megatron_patch_wrapped__ = True
    return wrapper


@register("typenames.optimizer",
          "torch.Tensor.type within clip_grad_by_total_norm_fp32, "
          "Float16OptimizerWithFloat16Params.__init__, "
          "DistributedOptimizer._build_model_and_main_param_groups",
          "dtype checks compare Tensor.type() with 'torch.cuda.FloatTensor' strings",
          stage="megatron", when="cpu")
def _typenames_optimizer():
    from megatron.core.optimizer import distrib_optimizer, optimizer

    if not getattr(torch.Tensor.type, "__megatron_patch_wrapped__", False):
        torch.Tensor.type = _tensor_type_with_cuda_names(torch.Tensor.type)
    optimizer.clip_grad_by_total_norm_fp32 = _with_cuda_type_names(optimizer.clip_grad_by_total_norm_fp32)
    cls = optimizer.Float16OptimizerWithFloat16Params
    cls.__init__ = _with_cuda_type_names(cls.__init__)
    do = distrib_optimizer.DistributedOptimizer
    do._build_model_and_main_param_groups = staticmethod(
        _with_cuda_type_names(do._build_model_and_main_param_groups))


@register("tp.native_linear",
          "megatron.core.tensor_parallel.layers.linear_with_grad_accumulation_and_async_allreduce",
          "speed: without an input-gradient all-reduce, sequence parallelism, gradient-accumulation "
          "fusion or deferred weight gradients, megatron-core's linear autograd function is "
          "matmul (+ bias) with a Python backward; torch's own matmul gives the same gradients "
          "from C++ nodes (every RowParallelLinear, and ColumnParallelLinear at TP = 1)",
          stage="megatron", when="cpu")
def _tp_native_linear():
    from megatron.core.tensor_parallel import layers

    original = layers.linear_with_grad_accumulation_and_async_allreduce

    @functools.wraps(original)
    def linear(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
               sequence_parallel, grad_output_buffer=None, wgrad_deferral_limit=0,
               async_grad_allreduce=None, tp_group=None):
        if (allreduce_dgrad or sequence_parallel or gradient_accumulation_fusion
                or grad_output_buffer is not None or async_grad_allreduce is not None):
            return original(input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad,
                            sequence_parallel, grad_output_buffer, wgrad_deferral_limit,
                            async_grad_allreduce, tp_group)
        # megatron-core's forward, operation for operation; its backward's products
        # (grad_output @ weight, grad_output^T @ input, grad_output summed over tokens) are
        # what autograd computes for these two operations
        output = torch.matmul(input, weight.t())
        return output + bias if bias is not None else output

    layers.linear_with_grad_accumulation_and_async_allreduce = linear


@register("tp.one_rank_mappings",
          "megatron.core.tensor_parallel.layers.copy_to_/reduce_from_tensor_model_parallel_region",
          "speed: on a tensor-parallel group of one rank both are identities forward and "
          "backward, yet each adds a Python autograd node (one per linear layer)",
          stage="megatron", when="cpu")
def _tp_one_rank_mappings():
    from megatron.core.tensor_parallel import layers

    def one_rank(fn):
        @functools.wraps(fn)
        def mapping(input_, group=None):
            if group is not None and group.size() == 1:
                return input_
            return fn(input_, group=group)

        return mapping

    layers.copy_to_tensor_model_parallel_region = one_rank(layers.copy_to_tensor_model_parallel_region)
    layers.reduce_from_tensor_model_parallel_region = one_rank(
        layers.reduce_from_tensor_model_parallel_region)


@register("moe.dtoh_as_numpy", "megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu",
          "all_to_all_single needs split sizes as lists; the original converts only CUDA tensors",
          stage="megatron", when="cpu")
def _moe_dtoh_as_numpy():
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


@register("dist_ckpt.fork_results_queue",
          "megatron.core.dist_checkpointing.strategies.filesystem_async._get_write_results_queue",
          "speed: the spawn-context Manager re-imports __main__ and costs ~6 s on the first save of "
          "each process; a fork-context Manager costs ~0.2 s and writes the same files",
          stage="megatron", when="cpu")
def _dist_ckpt_fork_queue():
    import multiprocessing as mp

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    def _get_write_results_queue():
        if fa._results_queue is None:
            fa._results_queue = mp.get_context("fork").Manager().Queue()
        return fa._results_queue

    if not hasattr(fa, "_get_write_results_queue"):
        raise AttributeError("filesystem_async._get_write_results_queue is gone")
    fa._get_write_results_queue = _get_write_results_queue
