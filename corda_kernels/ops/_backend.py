"""Backend choice shared by every op: Triton on CUDA, the torch reference elsewhere."""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_ENV = "CORDA_KERNELS_BACKEND"
_AUTOTUNE_ENV = "CORDA_KERNELS_AUTOTUNE"
_TMA_ENV = "CORDA_KERNELS_TMA"


@functools.cache  # asked on every op call; a failing import is slow and its answer cannot change
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(backend: str, *tensors: torch.Tensor, supported: bool = True) -> str:
    """Return "triton" or "torch" for a call.

    ``supported`` is the op's own verdict on dtypes and shapes; "auto" only
    picks Triton when it holds and every tensor lives on a CUDA device.

    ``CORDA_KERNELS_BACKEND=torch`` wins over everything, so a user can rule out
    the kernels when chasing a numerical difference; ``=triton`` makes "auto" pick
    the kernels wherever they support the dtype (on CPU tensors only under
    ``TRITON_INTERPRET=1``), and leaves an explicit ``backend="torch"`` alone.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{_ENV} must be one of {BACKENDS}, got {forced!r}")
        if forced == "torch":
            return "torch"
        if forced == "triton" and backend == "auto" and supported:
            # Upgrades "auto" only: an explicit backend="torch", or a dtype the kernels do not take,
            # stays on torch.
            backend = "triton"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' was asked for but triton is not installed")
        if not interpreting() and any(not t.is_cuda for t in tensors):
            raise RuntimeError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels on the CPU)"
            )
        return "triton"
    ok = supported and all(t.is_cuda for t in tensors)
    return "triton" if ok and triton_available() else "torch"


@functools.cache
def tensor_descriptor_class():
    """Triton's host-side TMA descriptor class, or None where Triton lacks it (before 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except Exception:
        return None
    return TensorDescriptor


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def tma_device(t: torch.Tensor) -> bool:
    """Whether kernels may read ``t`` through TMA descriptors: on a Hopper GPU (sm_90) with a
    Triton that has them (3.4+), unless ``CORDA_KERNELS_TMA=0``. ``CORDA_KERNELS_TMA=1`` also
    turns them on for newer GPUs and under the interpreter, which emulates them (the CPU tests
    of the TMA configs).
    On by default since an H200 run (2026-11-30, bench/RESULTS.md): the TMA configs passed every
    tile test there, and made the forward GEMM 13-15% and the large covariance updates 6-15%
    faster than pointer loads."""
    if os.environ.get(_TMA_ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not autotune_enabled():  # one pointer config then: descriptors would only cost host time
        return False
    if tensor_descriptor_class() is None:
        return False
    if t.is_cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        major = _capability(index)[0]
        # Timed and compile-checked on sm_90 only; newer chips differ in shared memory: when asked for.
        return major == 9 or (major > 9 and tma_requested())
    return interpreting() and tma_requested()


def tma_requested() -> bool:
    """``CORDA_KERNELS_TMA=1``: TMA configs also where the default leaves them out (the
    interpreter, and layouts not yet measured faster on a GPU)."""
    return os.environ.get(_TMA_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def tma_rows(t: torch.Tensor) -> bool:
    """Whether a 2-D ``t`` can back a TMA descriptor as it is laid out: 16-bit elements,
    unit stride along dim 1, rows that do not overlap (a broadcast row has stride 0, which a
    tensor map cannot encode), and base and row stride on 16-byte boundaries (the copy engine
    moves 16-byte units). Callers fall back to pointer loads otherwise."""
    if t.dim() != 2 or t.dtype not in (torch.float16, torch.bfloat16) or min(t.shape) < 1:
        return False
    size = t.element_size()
    return t.stride(1) == 1 and t.stride(0) >= t.shape[1] and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (a driver query: once per device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def tf32_matmul() -> bool:
    """Whether torch lets CUDA matmuls run fp32 inputs in TF32, set through either API.

    Reading the legacy ``allow_tf32`` raises once the newer ``fp32_precision``
    was set (as transformers' ``tf32=True`` does), so the new one is read first.
    """
    prec = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if prec is not None:
        return prec == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


@contextlib.contextmanager
def full_fp32_matmul():
    """Run fp32 CUDA matmuls in full precision inside the block, whatever the TF32 setting.

    The decomposition and merges promise results equal to fp32 rounding; a user's
    ``allow_tf32`` (10-bit mantissa) would silently break that. The setting is restored on exit.
    """
    m = torch.backends.cuda.matmul
    if getattr(m, "fp32_precision", None) is not None:
        old = m.fp32_precision
        m.fp32_precision = "ieee"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = False
        try:
            yield
        finally:
            m.allow_tf32 = old


def on_device(t: torch.Tensor):
    """Context for a kernel launch on ``t``'s GPU: Triton launches on the *current* device and stream."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def autotune_enabled() -> bool:
    return os.environ.get(_AUTOTUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def deferred_benchmarker(kernel_call, quantiles=None):
    """The GPU driver's benchmarker, looked up when an autotuner first times a config."""
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def autotune(kernel, **options):
    """``triton.autotune(**options)(kernel)`` that needs no GPU driver until it first tunes.

    Triton 3.2 and 3.3 ask the driver for a benchmarker when an autotuner is built, so on a
    machine without a GPU (also under ``TRITON_INTERPRET=1``) decorating a kernel, and with it
    ``import corda_kernels``, failed with "0 active drivers". 3.3 takes ``do_bench=``; 3.2's
    decorator drops it, so there the autotuner is built directly.
    """
    import triton

    if interpreting():
        _interpreter_accepts_config_options()
    try:
        return triton.autotune(do_bench=deferred_benchmarker, **options)(kernel)
    except RuntimeError as err:
        if "active driver" not in str(err):
            raise
    from triton.runtime.autotuner import Autotuner

    unsupported = set(options) - {"configs", "key", "reset_to_zero", "restore_value", "prune_configs_by"}
    if unsupported:
        raise TypeError(f"autotune options {sorted(unsupported)} are not passed on by the Triton 3.2 fallback")
    return Autotuner(
        kernel,
        kernel.arg_names,
        options["configs"],
        options["key"],
        options.get("reset_to_zero"),
        options.get("restore_value"),
        prune_configs_by=options.get("prune_configs_by"),
        do_bench=deferred_benchmarker,
    )


def _interpreter_accepts_config_options() -> None:
    # Triton 3.2's interpreter drops only the launch options it lists, and every Config also
    # passes the warp-specialization ones: each kernel call failed with an "unexpected keyword
    # argument". Later releases have no such list and drop the options themselves.
    from triton.runtime import interpreter

    reserved = getattr(interpreter, "RESERVED_KWS", None)
    if isinstance(reserved, list):
        for name in ("num_buffers_warp_spec", "num_consumer_groups", "reg_dec_producer", "reg_inc_consumer"):
            if name not in reserved:
                reserved.append(name)


def tuning_configs(configs: list) -> list:
    """A kernel's autotune candidates; with ``CORDA_KERNELS_AUTOTUNE=0`` only the one with the
    smallest tiles and fewest stages, which fits any supported GPU's shared memory and compiles
    once per specialization (for test runs, where tuning time is pure cost)."""
    if autotune_enabled() or not configs:
        return configs

    def size(c):
        return math.prod(v for k, v in c.kwargs.items() if k.startswith("BLOCK_")) * c.num_stages

    return [min(configs, key=size)]
