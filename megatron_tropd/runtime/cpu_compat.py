"""CPU compatibility layer for megatron-core: lets the GPU code path run unchanged on a CPU host.

megatron-core assumes CUDA in a few places (see shared/docs/MEGATRON_ON_CPU.md):
  1. allocations on `torch.cuda.current_device()`, `torch.cuda.synchronize()` / `current_stream()` /
     `Event` calls;
  2. the model-parallel RNG tracker, which saves and restores CUDA generator states;
  3. literal `device="cuda"` tensors (schedules, grad clipping, optimizer) and type checks such as
     `grad.type() == "torch.cuda.FloatTensor"`.
This module bridges all three, and nothing else:
  - `torch.cuda` helper functions become CPU no-ops (`current_device()` returns 0, which the device
    mode below maps to the CPU);
  - `CpuRNGStatesTracker` replaces megatron's tracker and forks the CPU generator instead;
  - `_CudaToCpuMode`, a `TorchFunctionMode`, maps any CUDA device argument to the CPU and reports
    CUDA type names from `Tensor.type()`.

`enable()` is called by `initialize.initialize_distributed()` and does nothing when CUDA is available,
so the GPU/NCCL path is untouched. It is idempotent. The first two bridges are process-wide; the
third is scoped: `cuda_to_cpu()` (a context manager and decorator) holds the mode around the
calls into megatron-core that allocate on a CUDA device or check CUDA type names (start-up, model
and optimiser construction, the schedules and the optimiser step, checkpoint I/O, the rotary
embedding's forward: `scope_forward`). Everything else, generation's KV-cache path above all, runs without it: a mode sends
every torch call through Python (its cost: docs/PERFORMANCE.md, "Rollout"). A megatron-core change
that allocated on a CUDA device outside those calls fails loudly ("Torch not compiled with CUDA"),
not silently.
"""

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def is_enabled() -> bool:
    return _ENABLED


def enable() -> bool:
    """Switch the layer on when CUDA is absent. Returns True when it is (now) active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _patch_torch_cuda()
    _install_rng_tracker()
    _ENABLED = True
    return True


_SCOPE = threading.local()  # how deep this thread is inside `cuda_to_cpu`


@contextlib.contextmanager
def cuda_to_cpu():
    """CUDA device arguments of torch calls mapped to the CPU inside the block (or the decorated
    function), when the layer is enabled; nothing otherwise. Nested scopes hold one mode."""
    depth = getattr(_SCOPE, "depth", 0)
    if not _ENABLED or depth:
        _SCOPE.depth = depth + 1
        try:
            yield
        finally:
            _SCOPE.depth = depth
        return
    _SCOPE.depth = 1
    try:
        with _CudaToCpuMode():
            yield
    finally:
        _SCOPE.depth = 0


def scope_forward(module):
    """`module`'s forward inside `cuda_to_cpu` from now on, when the layer is enabled: for a
    megatron module that allocates on the current CUDA device at every call (the rotary embedding
    moves its frequencies there), so that any forward through it works on a CPU host."""
    if _ENABLED:
        module.forward = cuda_to_cpu()(module.forward)


# --- 1. torch.cuda helpers -------------------------------------------------------------------


class _NoOpStream:
    """Stands in for a CUDA stream or event: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, _name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    # Classes, not functions: libraries imported later annotate with `torch.cuda.Stream | None`.
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.set_device = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *args, **kwargs: 0
    cuda.max_memory_allocated = lambda *args, **kwargs: 0
    # Seeding the (absent) CUDA generators is a no-op; the CPU generator is seeded separately.
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None


# --- 2. model-parallel RNG tracker -------------------------------------------------------------


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """megatron's RNG-states tracker, keeping CPU generator states instead of CUDA ones.

        Same names and seeds as megatron (`model_parallel_cuda_manual_seed` calls `add`), so
        dropout and initialisation inside `fork()` draw from the same per-rank streams.
        """

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _install_rng_tracker():
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # model_parallel_cuda_manual_seed re-creates the tracker unless told otherwise; keep ours.
    mrandom.initialize_rng_tracker = lambda *args, **kwargs: None
    # megatron's checkpoint code reads the CUDA RNG state through these helpers.
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


# --- 3. CUDA device arguments --------------------------------------------------------------------


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


_CPU = torch.device("cpu")
_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_TYPE = torch.Tensor.type
_TENSOR_TO = torch.Tensor.to


class _CudaToCpuMode(TorchFunctionMode):
    """Runs every torch call with CUDA device arguments on the CPU instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_CUDA:
            return args[0]
        if func is _TENSOR_TYPE and len(args) == 1 and not kwargs:
            # megatron's grad clipping and distributed optimizer check for CUDA type names.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is _TENSOR_TO and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)
