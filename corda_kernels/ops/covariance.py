"""Streaming covariance update: acc += Σ_rows (scale·x)ᵀ(scale·x), upper triangle only.

Layout of the accumulator: only tiles on and above the diagonal are kept up to
date. Entries strictly below the diagonal hold partial sums and must not be
read; ``covariance_result`` mirrors the upper triangle once at the end. Both
backends follow that contract, so an accumulator can be fed by either.

This file holds, top to bottom: the Triton kernel, the launchers (the torch
reference, which is what runs on the CPU, and the Triton one), and the public
entry points.
"""

from __future__ import annotations

import torch

from ._backend import resolve

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the package works without triton, on the torch path
    triton = None
    tl = None

#: Width of a row band in the torch triangle update. Measured on the 2-core dev
#: box (bench/bench_ops.py): bands narrower than ~256 lose to BLAS overheads.
TORCH_BAND = 256

ACC_DTYPES = (torch.float32, torch.float64)
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(acc: torch.Tensor, x: torch.Tensor) -> int:
    if acc.dim() != 2 or acc.shape[0] != acc.shape[1]:
        raise ValueError(f"acc must be a square (d, d) matrix, got shape {tuple(acc.shape)}")
    if acc.dtype not in ACC_DTYPES:
        raise TypeError(f"acc must be float32 or float64, got {acc.dtype}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    d = acc.shape[0]
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x must have shape (..., {d}) to match acc, got {tuple(x.shape)}")
    if x.device != acc.device:
        raise ValueError(f"x is on {x.device} but acc is on {acc.device}")
    return d


def row_weights(x: torch.Tensor, mask: torch.Tensor | None, scale: torch.Tensor | None):
    """Flatten ``mask`` and ``scale`` to per-row vectors over x's leading dims.

    ``scale`` may cover fewer leading dims than x (one weight per sequence):
    it is broadcast over the trailing ones. Returns (keep: bool | None, scale: float | None),
    each of shape (rows,).
    """
    lead = x.shape[:-1]
    keep = None
    if mask is not None:
        if mask.shape != lead:
            if mask.numel() != lead.numel():
                raise ValueError(f"mask has shape {tuple(mask.shape)} but x's leading dims are {tuple(lead)}")
            mask = mask.reshape(lead)
        keep = mask.reshape(-1).to(device=x.device) != 0
    s = None
    if scale is not None:
        scale = torch.as_tensor(scale, device=x.device)
        while scale.dim() < len(lead):
            scale = scale.unsqueeze(-1)
        try:
            s = scale.expand(lead).reshape(-1)
        except RuntimeError as e:
            raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast to {tuple(lead)}") from e
    return keep, s


def covariance_update_torch(acc: torch.Tensor, x: torch.Tensor, mask=None, scale=None, band: int = TORCH_BAND):
    """Reference update with the same triangle contract as the kernel.

    Dropped rows are zeroed with ``where`` (not multiplied), so a NaN in a
    padding position cannot leak into the sum; no host synchronization.
    """
    d = acc.shape[0]
    keep, s = row_weights(x, mask, scale)
    xf = x.reshape(-1, d).to(acc.dtype)
    if s is not None:
        xf = xf * s.to(acc.dtype).unsqueeze(1)
    if keep is not None:
        xf = torch.where(keep.unsqueeze(1), xf, xf.new_zeros(()))
    if d <= 2 * band:
        acc.addmm_(xf.T, xf)
        return acc
    # Row band i only needs columns i: onward; this skips the lower triangle's flops.
    for i in range(0, d, band):
        acc[i : i + band, i:].addmm_(xf[:, i : i + band].T, xf[:, i:])
    return acc


def covariance_update_triton(acc: torch.Tensor, x: torch.Tensor, mask=None, scale=None):  # pragma: no cover
    raise NotImplementedError("the Triton covariance kernel is not built yet")


def covariance_update(acc: torch.Tensor, x: torch.Tensor, mask=None, *, scale=None, backend: str = "auto"):
    """In place: add Σ over kept rows of scale²·xxᵀ to the upper triangle of ``acc``.

    ``x`` is (..., d) in fp32/fp16/bf16 with any strides; ``mask`` (bool or 0/1)
    drops rows; ``scale`` is a per-row or per-sequence weight applied to x.
    Read the full matrix with :func:`covariance_result`.
    """
    _check(acc, x)
    which = resolve(backend, acc, x, supported=x.dtype in X_DTYPES and acc.dtype in ACC_DTYPES)
    if which == "triton":
        return covariance_update_triton(acc, x, mask, scale)
    return covariance_update_torch(acc, x, mask, scale)


def covariance_result(acc: torch.Tensor) -> torch.Tensor:
    """Full symmetric (d, d) matrix from a triangle accumulator (a new tensor)."""
    upper = torch.triu(acc)
    return upper + torch.triu(acc, diagonal=1).T


def covariance_reference(x: torch.Tensor, mask=None, scale=None) -> torch.Tensor:
    """Float64 ground truth: Σ over kept rows of scale²·xxᵀ, plain and slow."""
    keep, s = row_weights(x, mask, scale)
    xf = x.reshape(-1, x.shape[-1]).double()
    if s is not None:
        xf = xf * s.double().unsqueeze(1)
    if keep is not None:
        xf = xf[keep]
    return xf.T @ xf
