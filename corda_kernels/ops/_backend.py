"""Backend choice shared by every op: Triton on CUDA, the torch reference elsewhere."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
_ENV = "CORDA_KERNELS_BACKEND"


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
    the kernels when chasing a numerical difference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{_ENV} must be one of {BACKENDS}, got {forced!r}")
        if forced == "torch":
            return "torch"
        if forced == "triton":
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
