"""CPU compat layer: makes megatron-core run on a CUDA-less machine over gloo.

Active only when ``torch.cuda.is_available()`` is False; on a GPU machine
``enable_cpu_compat()`` is a no-op and returns False.

What it does (process-wide, idempotent):

1. Device redirect. megatron-core asks for CUDA in ~175 places
   (``torch.cuda.current_device()``, ``device="cuda"``, ``tensor.cuda()``: rotary
   ``inv_freq``, the global memory buffer of dot-product attention, the pipeline
   schedule's token counters, ...). A ``TorchFunctionMode`` rewrites every
   ``device=`` argument that names CUDA (a ``"cuda[:i]"`` string, a CUDA
   ``torch.device`` or a bare int ordinal) to ``"cpu"``, turns ``Tensor.cuda()``
   into a no-op, and rewrites CUDA targets of ``Tensor.to(...)``.
   ``torch.cuda.current_device`` returns 0 and a few CUDA-only helpers
   (``synchronize``, ``empty_cache``, memory queries, ``manual_seed``) become
   harmless no-ops; ``torch.cuda.Stream`` / ``Event`` / ``stream()`` become no-op
   stand-ins and ``pin_memory`` requests are dropped. ``Tensor.type()`` (no argument) of a float tensor answers the
   CUDA name (``torch.cuda.FloatTensor``...): megatron's distributed and
   mixed-precision (bf16) optimizers sort their params by it. Python ``backward``
   methods of autograd Functions run under the same redirect (``BackwardCFunction``),
   so sequence-parallel linears and activation recomputation work.
2. Without TransformerEngine, megatron's ``is_te_min_version`` (called by the
   offload / precision-aware optimizer checks) answers False instead of raising.
   The CPU-offload optimizer (``HybridDeviceOptimizer``) picks its host copies by
   ``param.is_cuda``; a twin of that one method treats its params as the device
   params, so megatron's offload step (host copies, CPU Adam, copy back) runs. The
   distributed optimizer's fully-reshardable checkpoint load, which trips over torch
   Adam's ``step`` state (no apex / TE), copies only the loaded keys, and each param
   gets its own ``step`` tensor after a load (megatron hands one object to all).
   Megatron's ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor``
   grads; it is swapped for a CPU twin with the same formula. ``dist_checkpointing``'s
   file writer forks one process per bucket, and the fork deadlocks in a process
   that already runs gloo threads (the "save hangs over gloo" symptom); on CPU the
   buckets are written in-process by the same worker function.
   MoE (megatron 0.16.1 without TE): the alltoall token dispatcher's side stream is the ``torch.cuda.Stream``
   stand-in above; the router's fp32 GEMM names ``te_general_gemm``, which exists only with TE (set to None:
   megatron's torch path); the EP all-to-all passes split sizes to gloo as lists, not tensors; the uneven
   all-gather / reduce-scatter of the dispatcher over the expert-TP group (gloo has equal-size all_gather and
   no list reduce_scatter) become a padded all-gather / an all-reduce plus slice.
3. RNG tracker. megatron's ``get_cuda_rng_tracker()`` forks CUDA generator
   states (attention dropout, TP weight init). It is replaced by
   :class:`CpuRNGStatesTracker`, which keeps named CPU generator states and
   swaps them into torch's default CPU generator inside ``fork()``; megatron's
   ``_get/_set_cuda_rng_state`` (used by activation recomputation) read and write
   the CPU generator.

The mode is pushed once and never popped; it costs a Python call per torch
function (a fast path: one keyword probe and one set lookup), which is fine for the tiny CPU models this
path exists for (tools/bench_step.py measures the train step against plain PyTorch).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_LOCK = threading.Lock()
_MODE: "_CudaToCpuMode | None" = None


# Tensor.type() answers under the redirect (the float types megatron's optimizers accept)
_CUDA_TYPE_NAMES = {f"torch.{t}": f"torch.cuda.{t}" for t in ("FloatTensor", "HalfTensor", "BFloat16Tensor")}


def _is_cuda_device(dev: Any) -> bool:
    """True when ``dev`` names a CUDA device (str, torch.device or int ordinal)."""
    if isinstance(dev, bool):
        return False
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Torch function mode that maps every CUDA device request to the CPU.

    It sees every torch call of the process, so the common case (no ``device``/``pin_memory`` keyword, not one
    of the four rewritten methods) is one dict probe and one identity test before calling through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            if ("device" in kwargs and _is_cuda_device(kwargs["device"])) or kwargs.get("pin_memory"):
                kwargs = dict(kwargs)
                if "device" in kwargs and _is_cuda_device(kwargs["device"]):
                    kwargs["device"] = "cpu"
                if kwargs.get("pin_memory"):
                    kwargs["pin_memory"] = False  # page-locked host memory needs an accelerator
        else:
            kwargs = {}
        if func in _REWRITTEN:
            if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
            elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
                # megatron's mixed-precision and distributed optimizers sort params by their CUDA type name
                name = func(*args)
                return _CUDA_TYPE_NAMES.get(name, name)
        return func(*args, **kwargs)


_REWRITTEN = frozenset({torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.to, torch.Tensor.type})


class CpuRNGStatesTracker:
    """Named CPU RNG states standing in for megatron's CudaRNGStatesTracker.

    Same interface (``reset/get_states/set_states/add/fork/is_initialized``);
    ``fork(name)`` swaps the named state into torch's default CPU generator and
    restores the caller's state afterwards.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._current_state_name = "default-rng"

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"rng seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        orig_name = self._current_state_name
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)
            self._current_state_name = orig_name


def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """Stands in for megatron's _get_cuda_rng_state: the CPU generator is the only one."""
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    """Stands in for megatron's _set_cuda_rng_state."""
    torch.set_rng_state(new_state)


def _install_rng_tracker() -> None:
    """Make megatron's global RNG tracker a CpuRNGStatesTracker."""
    from megatron.core.tensor_parallel import random as mrandom

    # activation recomputation saves/restores the "CUDA" RNG state around each checkpointed chunk
    mrandom._get_cuda_rng_state = _cpu_get_rng_state
    mrandom._set_cuda_rng_state = _cpu_set_rng_state
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event``: CPU work is already ordered, so every wait is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` (megatron's offload optimizer and MoE dispatcher make side streams)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()


def _patch_torch_cuda() -> None:
    """Replace CUDA-only helpers that megatron calls unconditionally."""
    def _make(name: str, value: Any):
        # one distinct function per attribute: torch._dynamo refuses a function
        # object registered under two torch names
        def _replacement(*args: Any, **kwargs: Any) -> Any:
            return value

        _replacement.__name__ = name
        _replacement.__qualname__ = f"rfpo_cpu_compat.{name}"
        return _replacement

    for name, value in (
        ("current_device", 0),
        ("synchronize", None),
        ("empty_cache", None),
        ("manual_seed", None),
        ("manual_seed_all", None),
        ("set_device", None),
        ("memory_allocated", 0),
        ("max_memory_allocated", 0),
        ("memory_reserved", 0),
        ("max_memory_reserved", 0),
        ("reset_peak_memory_stats", None),
    ):
        setattr(torch.cuda, name, _make(name, value))
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = _make("current_stream", _CPU_STREAM)
    torch.cuda.default_stream = _make("default_stream", _CPU_STREAM)
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU twin of megatron's clip_grad_by_total_norm_fp32 (which asserts torch.cuda.FloatTensor grads)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        for g in grads:
            g.mul_(clip_coeff)


def _inprocess_write_preloaded_data_multiproc(transform_list, use_msc, rank, write_buckets, global_results_queue):
    """In-process twin of FileSystemWriterAsync.write_preloaded_data_multiproc.

    megatron forks one writer process per bucket; forked from a process that already
    runs gloo / OpenMP threads, the child deadlocks on an inherited lock (this was the
    "dist_checkpointing.save hangs over gloo" symptom). The buckets are written here,
    one after the other, by the same worker function.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    results: dict | Exception = {}
    local_q: queue.Queue = queue.Queue()
    count_q: queue.Queue = queue.Queue()
    for i, bucket in enumerate(write_buckets):
        count_q.put(i)
        FileSystemWriterAsync.write_preloaded_data(
            transform_list, i, bucket, local_q, count_q, True, use_msc=use_msc
        )
        idx, res = local_q.get()
        if isinstance(res, Exception):
            results = res
            break
        results[idx] = res
    global_results_queue.put(results)


def _te_version():
    """TransformerEngine's version as megatron reads it, or None without TE."""
    from megatron.core.utils import get_te_version

    try:
        return get_te_version()
    except Exception:
        return None


def _no_te_min_version(version: str, check_equality: bool = True) -> bool:
    """megatron's is_te_min_version where TransformerEngine is absent."""
    return False


def _cpu_sub_optimizer_param_groups(self, offload_fraction: float):
    """CPU twin of ``HybridDeviceOptimizer._get_sub_optimizer_param_groups``.

    megatron decides what to offload by ``param.is_cuda``; on a CUDA-less machine no
    param is, so nothing would get a host copy and the step would look up copies that
    do not exist. Here the optimizer's own params play the device params: the first
    ``offload_fraction`` of their elements get a host copy (fp32 when
    ``param_update_in_fp32``) stepped by the CPU optimizer and copied back, exactly the
    bookkeeping megatron builds for device params (same five return values).
    """
    params = [p for group in self.param_groups for p in group["params"]]
    offload_threshold = sum(p.numel() for p in params) * offload_fraction
    offloaded = 0
    cpu_groups, gpu_groups = [], []
    gpu_to_cpu, cpu_to_gpu, to_fp32 = {}, {}, {}
    for group in self.param_groups:
        gpu_group, cpu_group = dict(group, params=[]), dict(group, params=[])
        for orig in group["params"]:
            param, copied = orig, False
            if offloaded < offload_threshold:
                param = orig.detach().clone()
                offloaded += param.numel()
                copied = True
            if self.param_update_in_fp32 and param.dtype != torch.float32:
                param = param.detach().clone().float()
                to_fp32[orig] = param
            if copied:
                gpu_to_cpu[orig] = param
                cpu_to_gpu[param] = orig
                cpu_group["params"].append(param)
            else:
                gpu_group["params"].append(param)
        if gpu_group["params"]:
            gpu_groups.append(gpu_group)
        if cpu_group["params"]:
            cpu_groups.append(cpu_group)
    return cpu_groups, gpu_groups, gpu_to_cpu, cpu_to_gpu, to_fp32


def _wrap_set_main_param_states(orig):
    """DistributedOptimizer._set_main_param_and_optimizer_states that copies only the keys it is given.

    With torch's Adam (no apex / TE) the optimizer state holds ``step`` next to the moments;
    megatron's fully-reshardable load leaves ``step`` out of the loaded tensors (it restores it
    from the param groups) and then looks it up: KeyError. Keys not loaded keep their value.
    """

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return orig(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            dst[key].copy_(value)

    set_states._rfpo_cpu_compat = True  # type: ignore[attr-defined]
    return set_states


def _wrap_dist_load_state_dict(orig):
    """DistributedOptimizer.load_state_dict that gives every param its own Adam ``step`` tensor.

    Without apex / TE, megatron 0.16 stores ONE ``step`` tensor object into every param's
    torch-Adam state; Adam increments ``step`` in place per param, so after a resume the
    shared counter advanced once per param per step and the bias correction went wrong.
    """

    def load_state_dict(self, state_dict):
        orig(self, state_dict)
        for opt in getattr(self.optimizer, "sub_optimizers", [self.optimizer]):
            for st in opt.state.values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].detach().clone()

    load_state_dict._rfpo_cpu_compat = True  # type: ignore[attr-defined]
    return load_state_dict


def _patch_megatron() -> None:
    """Swap megatron functions that assert CUDA tensor types or fork writers for CPU twins."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from megatron.core.optimizer import clip_grads, optimizer

    from megatron.core import optimizer as optimizer_pkg
    from megatron.core.optimizer import optimizer_config

    if _te_version() is None:
        # megatron's is_te_min_version compares None >= Version without TransformerEngine (the
        # precision-aware / offload optimizer checks call it): no TE means "not that version"
        for mod in (optimizer_config, optimizer_pkg):
            mod.is_te_min_version = _no_te_min_version
    from megatron.core.optimizer.cpu_offloading.hybrid_optimizer import HybridDeviceOptimizer

    HybridDeviceOptimizer._get_sub_optimizer_param_groups = _cpu_sub_optimizer_param_groups
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not getattr(DistributedOptimizer.load_state_dict, "_rfpo_cpu_compat", False):
        DistributedOptimizer.load_state_dict = _wrap_dist_load_state_dict(DistributedOptimizer.load_state_dict)
    if not getattr(DistributedOptimizer._set_main_param_and_optimizer_states, "_rfpo_cpu_compat", False):
        DistributedOptimizer._set_main_param_and_optimizer_states = _wrap_set_main_param_states(
            DistributedOptimizer._set_main_param_and_optimizer_states)
    clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(_inprocess_write_preloaded_data_multiproc)
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        # 0.16.1 reads te_general_gemm in RouterGatingLinearFunction but binds it only when TE imports
        # (NameError without TE; fixed upstream): None selects its plain-torch router GEMM
        moe_utils.te_general_gemm = None


def _as_split_list(sizes: Any) -> Any:
    """Split sizes as a list of ints (gloo's all_to_all_single raises TypeError on a tensor); None stays None."""
    if torch.is_tensor(sizes):
        return [int(x) for x in sizes.tolist()]
    return sizes


def _uneven_gather(orig):
    """megatron's _gather_along_first_dim whose uneven form (``output_split_sizes``, the MoE dispatcher over the
    expert-TP group) runs on gloo: gloo's all_gather takes equal sizes only, so every rank's rows are padded to
    the largest, gathered, and cut back (same result)."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        import torch.distributed as dist

        if output_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return orig(input_, group, output_split_sizes, use_global_buffer)
        sizes = _as_split_list(output_split_sizes)
        rows = max(sizes)
        padded = input_.new_zeros((rows, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    gather._rfpo_cpu_compat = True  # type: ignore[attr-defined]
    return gather


def _uneven_reduce_scatter(orig):
    """megatron's _reduce_scatter_along_first_dim whose uneven form (``input_split_sizes``) runs on gloo (no
    list reduce_scatter there): an all-reduce of the whole input, then this rank's rows (same result)."""

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        import torch.distributed as dist

        if input_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return orig(input_, group, input_split_sizes, use_global_buffer)
        sizes = _as_split_list(input_split_sizes)
        full = input_.contiguous().clone()
        dist.all_reduce(full, group=group)
        return torch.split(full, sizes, dim=0)[group.rank()].contiguous()

    reduce_scatter._rfpo_cpu_compat = True  # type: ignore[attr-defined]
    return reduce_scatter


def _patch_moe() -> None:
    """megatron 0.16.1 MoE on CPU: ``te_general_gemm`` and tensor split sizes of the EP all-to-all.

    ``moe_utils`` names ``te_general_gemm`` in the fp32 router GEMM but defines it only when
    TransformerEngine imports (NameError without TE; fixed upstream): it is set to None, megatron's own
    torch fallback. The alltoall dispatcher hands its split sizes to ``all_to_all_single`` as tensors,
    which gloo refuses (TypeError); megatron's ``_AllToAll`` gets them as lists (same values).
    """
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not getattr(mappings._gather_along_first_dim, "_rfpo_cpu_compat", False):
        mappings._gather_along_first_dim = _uneven_gather(mappings._gather_along_first_dim)
        mappings._reduce_scatter_along_first_dim = _uneven_reduce_scatter(mappings._reduce_scatter_along_first_dim)
    orig = mappings._AllToAll.forward
    if getattr(orig, "_rfpo_cpu_compat", False):
        return

    def forward(ctx, group, input, output_split_sizes, input_split_sizes):
        return orig(ctx, group, input, _as_split_list(output_split_sizes), _as_split_list(input_split_sizes))

    forward._rfpo_cpu_compat = True  # type: ignore[attr-defined]
    mappings._AllToAll.forward = staticmethod(forward)


def _patch_autograd_backward() -> None:
    """Run every ``autograd.Function.backward`` under the device redirect.

    The torch-function mode stack is not active inside the autograd engine's calls of
    Python ``backward`` methods, so megatron's backward passes that allocate on
    ``torch.cuda.current_device()`` (sequence-parallel all-gathers in the linear layers,
    the MoE dispatcher) or re-run the forward (activation recomputation's
    ``CheckpointFunction``) would ask for a CUDA device. The engine enters Python
    through ``BackwardCFunction.apply``; the redirect is pushed around it.
    """
    from torch.autograd import function as autograd_function

    orig = autograd_function.BackwardCFunction.apply
    if getattr(orig, "_rfpo_cpu_compat", False):
        return

    def apply(self, *args):
        with _CudaToCpuMode():
            return orig(self, *args)

    apply._rfpo_cpu_compat = True  # type: ignore[attr-defined]
    autograd_function.BackwardCFunction.apply = apply


def enable_cpu_compat() -> bool:
    """Enable the CPU redirect + RNG tracker once per process.

    Returns True when the compat layer is (now) active, False on CUDA machines
    where nothing is changed. Safe to call any number of times; call it before
    building megatron models. ``reinstall_rng_tracker()`` is called again by
    ``init_parallel`` after megatron may have reset the tracker.
    """
    global _ENABLED, _MODE
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _ENABLED:
            _install_rng_tracker()
            return True
        _patch_torch_cuda()
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()
        _install_rng_tracker()
        _patch_megatron()
        _patch_moe()
        _patch_autograd_backward()
        _ENABLED = True
    return True

