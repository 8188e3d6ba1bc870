"""The ONLY place where megafusion adapts megatron-core to a CPU-only machine (gloo, no CUDA).

megatron-core 0.16.1 hard-codes CUDA in code paths that are otherwise device-agnostic. Rather than forking those
paths, `enable_cpu_compat()` installs the adaptations below, once per process, and only when CUDA is absent (on a
GPU it returns False and touches nothing). Every adaptation names the megatron-core version and the functions it
targets, and is covered by a focused test in tests/parallel/test_parallel_cpu_compat.py (and end to end by
tests/parallel/test_parallel_layouts.py). `disable_cpu_compat()` undoes all of them.

Adaptations (megatron-core 0.16.1):

  A. CudaToCpuMode, a torch.overrides.TorchFunctionMode pushed on the thread that calls enable_cpu_compat (the
     training thread) and left there until disable_cpu_compat: tensor factories and `.to()` called with
     device='cuda' / 'cuda:N' / torch.device('cuda') / an int device index get device='cpu'; `Tensor.cuda()`
     returns the CPU tensor; `pin_memory=True` is dropped;
     `Tensor.record_stream` is a no-op. Targets e.g. pipeline_parallel/schedules.py
     (`torch.zeros([], device="cuda")` in forward_backward_*), pipeline_parallel/p2p_communication.py
     (`torch.empty(..., device=torch.cuda.current_device())` in _communicate_shapes/_communicate),
     distributed/param_and_grad_buffer.py (_ParamAndGradBuffer buffers), optimizer/clip_grads.py, router/experts
     of transformer/moe, transformer/dot_product_attention.py (DotProductAttention.__init__), grad_scaler.py.
     Scope: code run by the autograd engine (custom Function backwards) runs outside the mode, because the mode
     receives Tensor.backward / torch.autograd.backward themselves and hands them on with itself popped; B covers
     the literal megatron uses there.
  B. torch.cuda shims, where a function mode cannot reach because no tensor function is called, or because the
     code runs inside the autograd engine (custom Function backwards, e.g. tensor_parallel/mappings.py
     _GatherFromSequenceParallelRegion.backward): torch.cuda.current_device -> torch.device("cpu"),
     torch.cuda.synchronize -> no-op,
     torch.cuda.Stream / Event / current_stream / stream -> CpuStream / CpuEvent stand-ins whose waits and syncs are
     no-ops (CPU ops are synchronous). Targets p2p_communication._communicate (torch.cuda.synchronize),
     utils.GlobalMemoryBuffer.get_tensor (the all-gather buffer of sequence-parallel linears,
     tensor_parallel/layers.py LinearWithGradAccumulationAndAsyncCommunication),
     MoEAlltoAllTokenDispatcher.__init__ and ._maybe_dtoh_and_synchronize (cuda_dtoh_stream, record_event,
     d2h_event.synchronize), DistributedDataParallel.__init__ (communication_stream). The all-to-all dispatcher also
     needs transformer/moe/moe_utils.maybe_move_tensor_to_cpu(as_numpy=True) to return numpy split sizes for a
     tensor already on the CPU (it returns the tensor unchanged unless `tensor.is_cuda`, and all_to_all_single
     rejects a tensor of split sizes); it is wrapped to do so, in moe_utils and in token_dispatcher, which imported
     it by name. With these the all-to-all MoE dispatcher runs on CPU (gloo all_to_all_single); the allgather
     dispatcher needs nothing.
  C. CpuRNGStatesTracker replaces tensor_parallel.random.CudaRNGStatesTracker (the module-level class name used by
     initialize_rng_tracker, so model_parallel_cuda_manual_seed creates it): add()/fork() keep named states of the
     CPU generator, so dropout under get_cuda_rng_tracker().fork() (DotProductAttention.forward, tensor-parallel
     weight init) is reproducible and distinct per tensor-parallel rank. tensor_parallel.random._get_cuda_rng_state
     / _set_cuda_rng_state are redirected to the CPU generator so CheckpointFunction (activation recompute) and
     _get_all_rng_states work.
  D. Optimizer dtype checks: DistributedOptimizer.__init__ / _build_model_and_main_param_groups,
     Float16OptimizerWithFloat16Params.__init__ (optimizer/distrib_optimizer.py, optimizer/optimizer.py) and
     clip_grads.clip_grad_by_total_norm_fp32 (called by MegatronOptimizer.step) accept only `tensor.type()` in
     torch.cuda.{Float,Half,BFloat16}Tensor. While those functions run, mode A reports a CPU tensor's type() as
     torch.cuda.<Type> (and only then). FP32Optimizer.__init__'s device='cuda' scalar (_scale)
     and MixedPrecisionOptimizer's found_inf are handled by mode A.
  E. Pipeline p2p order on gloo: P2PCommunicator._communicate with config.batch_p2p_comm (the default) posts
     [send_prev, recv_prev, send_next, recv_next] through p2p_communication._batched_p2p_ops. With PP=2 the previous
     and the next stage are the same peer, and gloo matches messages per (peer, tag) in posting order, so in the
     interleaved schedule an activation is received as a gradient. `_batched_p2p_ops` is redirected, for gloo groups
     only, to megatron's own `_p2p_ops` (even/odd ordering over two groups), whose requests are returned as the list
     _communicate expects. (_communicate_shapes, used only with config.variable_seq_lengths, keeps its batch.)
  F. (any device, without Transformer Engine) transformer/moe/moe_utils.py binds `te_general_gemm` only when its TE
     import block succeeds, yet RouterGatingLinearFunction.forward/backward test `te_general_gemm is not None`, so
     every MoE router raises NameError without TE. `fill_missing_te_names()` binds it to None, selecting megatron's
     own torch.mm path. It is applied by enable_cpu_compat() and, on GPU, by megafusion.parallel.initialize.

  G. Single-rank groups on gloo: distributed/param_and_grad_buffer.py's _ParamAndGradBucketGroup.start_grad_sync /
     start_param_sync reduce-scatter gradients and all-gather parameters over the data-parallel group even when it
     has one rank (DP=1: one process, or TP/PP only), and gloo copies the whole buffers through its transport
     (measured 11% of a training step at d=512, 8 layers; benchmarks/train_step.py --mode loop). For a 1-rank gloo
     group and a synchronous call these collectives are identities: the module's `dist_all_gather_func` /
     `dist_reduce_scatter_func` copy input to output only when they are distinct buffers, and its
     `_coalescing_manager` yields a completed handle (the ops inside ran one by one). Asynchronous calls
     (overlap_grad_reduce / overlap_param_gather) and larger groups go to the originals.

  H. Uneven first-dimension collectives on gloo: tensor_parallel/mappings.py _gather_along_first_dim /
     _reduce_scatter_along_first_dim with output_split_sizes / input_split_sizes (the alltoall MoE dispatcher's
     gathers over the expert-tensor-parallel group when TP and EP are both > 1: each rank holds a different number
     of tokens) call torch.distributed.all_gather / reduce_scatter with lists of unequal tensors, which gloo
     rejects. For gloo groups of more than one rank they are redirected to an equal-size all_gather of padded
     shares (then cut) and to an all_reduce of the whole input (then this rank's slice): the same values.
     Equal splits and NCCL go to the originals.

Known limits on CPU: flex_attention has no CPU backward. (Sequence parallelism needs norms that mark their
parameters for megatron's TP gradient all-reduce; megafusion's local norm does, megafusion/model/norm.py.)
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

MEGATRON_CORE_VERSION = "0.16.1"

_STATE: Dict[str, Any] = {"enabled": False, "mode": None, "restore": []}
_LOCAL = threading.local()  # .report_cuda_types: depth of optimizer constructors in progress


# ---------------------------------------------------------------------------------------------------------------
# A. device='cuda' -> CPU in tensor factories and moves


def _is_cuda_device(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


_TENSOR_TYPE = torch.Tensor.type
_TENSOR_TO = torch.Tensor.to
_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_RECORD_STREAM = torch.Tensor.record_stream


class CudaToCpuMode(TorchFunctionMode):
    """megatron-core 0.16.1: every `device="cuda"` / `device=torch.cuda.current_device()` literal (schedules, p2p,
    grad buffers, optimizers, MoE router/experts, DotProductAttention) lands on the CPU. See the module header."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda_device(device):
                kwargs = dict(kwargs, device="cpu")
            if kwargs.get("pin_memory"):
                kwargs = dict(kwargs, pin_memory=False)
        else:
            kwargs = {}
        if func is _TENSOR_TO:
            if len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], "cpu") + tuple(args[2:])
        elif func is _TENSOR_CUDA:
            return args[0]
        elif func is _TENSOR_RECORD_STREAM:
            return None
        elif func is _TENSOR_TYPE and len(args) == 1 and not kwargs and getattr(_LOCAL, "report_cuda_types", 0):
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not args[0].is_cuda else name
        return func(*args, **kwargs)


@contextlib.contextmanager
def reporting_cuda_tensor_types():
    """Inside this block (and with compat enabled) `cpu_tensor.type()` answers torch.cuda.<Type> (adaptation D)."""
    _LOCAL.report_cuda_types = getattr(_LOCAL, "report_cuda_types", 0) + 1
    try:
        yield
    finally:
        _LOCAL.report_cuda_types -= 1


# ---------------------------------------------------------------------------------------------------------------
# B. torch.cuda stand-ins


class CpuEvent:
    """Stand-in for torch.cuda.Event on CPU (megatron-core 0.16.1 MoEAlltoAllTokenDispatcher d2h_event): CPU work is
    synchronous, so recording, waiting and synchronizing are no-ops."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        return 0.0


class CpuStream(torch.Stream):
    """Stand-in for torch.cuda.Stream on CPU (megatron-core 0.16.1 MoEAlltoAllTokenDispatcher.cuda_dtoh_stream,
    DistributedDataParallel communication_stream): one ordered CPU queue, so every wait is a no-op. A torch.Stream
    (the CPU one), so `tensor.record_stream(stream)` parses and reaches mode A, which makes it a no-op."""

    def __new__(cls, device=None, priority: int = 0, **kwargs):
        return super().__new__(cls, device="cpu", priority=0)

    def __init__(self, device=None, priority: int = 0, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        return None

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event: Optional[CpuEvent] = None) -> CpuEvent:
        return event if event is not None else CpuEvent()

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_CURRENT_STREAM = CpuStream()


def _current_device() -> torch.device:
    # A device, not the index 0: megatron passes it straight to factories (device=torch.cuda.current_device()),
    # also inside custom autograd Function backwards, which the autograd engine runs outside mode A (the mode
    # receives Tensor.backward / torch.autograd.backward and hands them to torch with itself popped).
    return torch.device("cpu")


def _synchronize(device=None) -> None:
    return None


def _current_stream(device=None) -> CpuStream:
    return _CURRENT_STREAM


@contextlib.contextmanager
def _stream(stream):
    yield


_CUDA_SHIMS: Dict[str, Any] = {
    "current_device": _current_device,
    "synchronize": _synchronize,
    "Stream": CpuStream,
    "Event": CpuEvent,
    "current_stream": _current_stream,
    "stream": _stream,
}


def _patch_moe_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    for module in (moe_utils, token_dispatcher):
        setattr(module, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)
        _STATE["restore"].append(functools.partial(setattr, module, "maybe_move_tensor_to_cpu", original))


# ---------------------------------------------------------------------------------------------------------------
# C. CPU RNG tracker


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.__dict__.get("_MEGAFUSION_ORIGINAL_TRACKER", mrandom.CudaRNGStatesTracker)

    class CpuRNGStatesTracker(base):
        """megatron-core 0.16.1 tensor_parallel.random.CudaRNGStatesTracker with the CPU generator: `add(name, seed)`
        stores a freshly seeded CPU generator state; `fork(name)` swaps it into torch's default CPU generator, runs
        the block, saves the advanced state back under `name` and restores the caller's state (nested forks behave
        as in megatron)."""

        def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
            if use_cudagraphable_rng:
                raise ValueError("CUDA-graph-safe RNG is not available on CPU (use_cudagraphable_rng=False)")
            super().__init__(use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker)

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                if self._current_state_name != name:
                    raise Exception(f"current rng state {self._current_state_name} is not the forked state {name}")
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _get_cpu_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # get_rng_state already returns a copy


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def install_cpu_rng_tracker() -> None:
    """Make megatron's RNG tracker the CPU one (adaptation C); later seeding goes through megatron's own
    tensor_parallel.model_parallel_cuda_manual_seed. Part of enable_cpu_compat(); callable alone."""
    from megatron.core.tensor_parallel import random as mrandom

    if "_MEGAFUSION_ORIGINAL_TRACKER" not in mrandom.__dict__:
        originals = {
            "CudaRNGStatesTracker": mrandom.CudaRNGStatesTracker,
            "_get_cuda_rng_state": mrandom._get_cuda_rng_state,
            "_set_cuda_rng_state": mrandom._set_cuda_rng_state,
        }
        mrandom._MEGAFUSION_ORIGINAL_TRACKER = originals["CudaRNGStatesTracker"]

        def restore():
            for key, value in originals.items():
                setattr(mrandom, key, value)
            del mrandom._MEGAFUSION_ORIGINAL_TRACKER
            mrandom.initialize_rng_tracker(force_reset=True)

        _STATE["restore"].append(restore)
        mrandom.CudaRNGStatesTracker = _cpu_rng_tracker_class()
        mrandom._get_cuda_rng_state = _get_cpu_rng_state
        mrandom._set_cuda_rng_state = _set_cpu_rng_state
    if not isinstance(mrandom._CUDA_RNG_STATE_TRACKER, mrandom.CudaRNGStatesTracker):
        mrandom.initialize_rng_tracker(force_reset=True)


# ---------------------------------------------------------------------------------------------------------------
# D. optimizer constructors


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with reporting_cuda_tensor_types():
            return fn(*args, **kwargs)

    wrapper._megafusion_wrapped = fn
    return wrapper


def _optimizer_targets() -> List[Tuple[Any, str, str]]:
    """(owner, attribute, kind) of every megatron-core 0.16.1 callable that checks `tensor.type()` against
    torch.cuda.* names; kind is method | static | class | function (a module-level function, patched in every
    module that imported it by name)."""
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    return [
        (DistributedOptimizer, "__init__", "method"),
        (DistributedOptimizer, "_build_model_and_main_param_groups", "class"),
        (Float16OptimizerWithFloat16Params, "__init__", "method"),
        (clip_grads, "clip_grad_by_total_norm_fp32", "function"),  # assert param.grad.type() == torch.cuda...
        (optimizer, "clip_grad_by_total_norm_fp32", "function"),  # MegatronOptimizer.step's imported name
    ]


def _patch_optimizers() -> None:
    for owner, name, kind in _optimizer_targets():
        original = owner.__dict__[name]
        if kind == "static":
            replacement = staticmethod(_with_cuda_type_names(original.__func__))
        elif kind == "class":
            replacement = classmethod(_with_cuda_type_names(original.__func__))
        else:
            replacement = _with_cuda_type_names(original)
        setattr(owner, name, replacement)
        _STATE["restore"].append(functools.partial(setattr, owner, name, original))


# ---------------------------------------------------------------------------------------------------------------
# E. pipeline p2p on gloo


def _patch_pipeline_p2p() -> None:
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    original = p2p._batched_p2p_ops

    @functools.wraps(original)
    def batched_p2p_ops(**kwargs):
        if torch.distributed.get_backend(kwargs["group"]) == "gloo":
            return list(p2p._p2p_ops(**kwargs).values())
        return original(**kwargs)

    p2p._batched_p2p_ops = batched_p2p_ops
    _STATE["restore"].append(functools.partial(setattr, p2p, "_batched_p2p_ops", original))


# ---------------------------------------------------------------------------------------------------------------
# F. names megatron-core leaves unbound without Transformer Engine


def fill_missing_te_names() -> bool:
    """Bind megatron-core 0.16.1 transformer/moe/moe_utils.te_general_gemm to None when TE did not import (see F).
    Returns True when it had to. Safe on any device; never overrides a bound name."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


# ---------------------------------------------------------------------------------------------------------------
# G. single-rank gloo groups in megatron's DDP buffers


class _Completed:
    """The handle of communication that had nothing to do."""

    def wait(self) -> None:
        return None


def _single_rank_gloo(group) -> bool:
    return group is not None and group.size() == 1 and torch.distributed.get_backend(group) == "gloo"


def _patch_single_rank_buffer_collectives() -> None:
    from megatron.core.distributed import param_and_grad_buffer as buffers

    original_manager = buffers._coalescing_manager

    @contextlib.contextmanager
    def coalescing_manager(group=None, device=None, async_ops=False):
        if async_ops or not _single_rank_gloo(group):
            with original_manager(group, device=device, async_ops=async_ops) as manager:
                yield manager
            return
        yield _Completed()

    def identity_on_one_rank(original):
        @functools.wraps(original)
        def collective(output, input_, *args, group=None, async_op=False, **kwargs):
            if async_op or not _single_rank_gloo(group):
                return original(output, input_, *args, group=group, async_op=async_op, **kwargs)
            if output.data_ptr() != input_.data_ptr():  # one rank: the shard is the whole buffer
                output.copy_(input_.view_as(output))
            return None

        return collective

    replacements = {
        "_coalescing_manager": coalescing_manager,
        "dist_all_gather_func": identity_on_one_rank(buffers.dist_all_gather_func),
        "dist_reduce_scatter_func": identity_on_one_rank(buffers.dist_reduce_scatter_func),
    }
    for name, replacement in replacements.items():
        _STATE["restore"].append(functools.partial(setattr, buffers, name, getattr(buffers, name)))
        setattr(buffers, name, replacement)


# ---------------------------------------------------------------------------------------------------------------
# H. Uneven first-dimension gathers / reduce-scatters on gloo


def _gloo(group) -> bool:
    return group is not None and torch.distributed.get_backend(group) == "gloo"


def _patch_uneven_sequence_collectives() -> None:
    from megatron.core.tensor_parallel import mappings

    gather, scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    @functools.wraps(gather)
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or not _gloo(group) or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((width * group.size(),) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * width:r * width + n] for r, n in enumerate(sizes)])

    @functools.wraps(scatter)
    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or not _gloo(group) or group.size() == 1:
            return scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start:start + sizes[group.rank()]].contiguous()

    for name, replacement in (("_gather_along_first_dim", gather_along_first_dim),
                              ("_reduce_scatter_along_first_dim", reduce_scatter_along_first_dim)):
        _STATE["restore"].append(functools.partial(setattr, mappings, name, getattr(mappings, name)))
        setattr(mappings, name, replacement)


# ---------------------------------------------------------------------------------------------------------------


def cpu_compat_enabled() -> bool:
    return _STATE["enabled"]


def enable_cpu_compat(force: bool = False) -> bool:
    """Install adaptations A-H (see the module header). Idempotent. Returns True when they are active; on a machine
    with CUDA (and force=False) it does nothing and returns False."""
    if _STATE["enabled"]:
        return True
    if torch.cuda.is_available() and not force:
        return False
    for name, shim in _CUDA_SHIMS.items():
        original = getattr(torch.cuda, name)
        setattr(torch.cuda, name, shim)
        _STATE["restore"].append(functools.partial(setattr, torch.cuda, name, original))
    _patch_moe_split_sizes()
    install_cpu_rng_tracker()
    _patch_optimizers()
    _patch_pipeline_p2p()
    _patch_single_rank_buffer_collectives()
    _patch_uneven_sequence_collectives()
    fill_missing_te_names()
    mode = CudaToCpuMode()
    mode.__enter__()
    _STATE["mode"] = mode
    _STATE["enabled"] = True
    return True


def disable_cpu_compat() -> None:
    """Undo enable_cpu_compat (tests; a process that wants plain megatron-core back)."""
    if not _STATE["enabled"]:
        return
    _STATE["mode"].__exit__(None, None, None)
    _STATE["mode"] = None
    for restore in reversed(_STATE["restore"]):
        restore()
    _STATE["restore"].clear()
    _STATE["enabled"] = False
