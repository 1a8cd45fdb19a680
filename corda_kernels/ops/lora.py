"""Low-rank adapter linear: y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ.

W and b are the frozen residual; gradients flow to x, A and B (and to W/b only
if a caller unfreezes them). The torch path never forms B@A and never writes a
separate (M, N) adapter output: the rank-r update is added into y with one
``addmm_``.

This file holds the torch reference launchers, the Triton seam, and the small
autograd Function that only saves tensors and calls launchers.
"""

from __future__ import annotations

import torch

from ._backend import resolve

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- torch launchers
def lora_forward_torch(x2, weight, bias, A, B, scaling, xd2):
    """x2: (M, K) input, xd2: the dropped-out input feeding A (x2 itself when p=0)."""
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    s = (xd2 @ A.t()).float()  # (M, r): tiny, kept in fp32 for backward
    y.addmm_(s.to(y.dtype), B.t(), alpha=scaling)
    return y, s


def lora_backward_torch(dy2, x2, xd2, keep, p, s, weight, A, B, scaling, needs):
    """Returns (dx, dW, db, dA, dB); entries not asked for by ``needs`` are None."""
    need_x, need_w, need_b, need_a, need_bb = needs
    ds = (dy2 @ B).float().mul_(scaling)  # (M, r)
    dx = dW = db = dA = dB = None
    if need_x:
        dx = dy2 @ weight
        if keep is None:
            dx.addmm_(ds.to(dx.dtype), A)
        else:
            dx.add_((ds.to(dx.dtype) @ A) * keep.to(dx.dtype), alpha=1.0 / (1.0 - p))
    if need_a:
        dA = (ds.t() @ xd2.float()).to(A.dtype)
    if need_bb:
        dB = (dy2.float().t() @ s).mul_(scaling).to(B.dtype)
    if need_w:
        dW = dy2.t() @ x2
    if need_b:
        db = dy2.sum(0)
    return dx, dW, db, dA, dB


# ----------------------------------------------------------------------------- Triton seam
def lora_forward_triton(x2, weight, bias, A, B, scaling, xd2):  # pragma: no cover
    raise NotImplementedError("the Triton adapter kernel is not built yet")


def lora_backward_triton(dy2, x2, xd2, keep, p, s, weight, A, B, scaling, needs):  # pragma: no cover
    raise NotImplementedError("the Triton adapter kernel is not built yet")


# ----------------------------------------------------------------------------- autograd glue
class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scaling, dropout_p, which):
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        keep = None
        xd2 = x2
        if dropout_p > 0.0:
            keep = torch.rand_like(x2, dtype=torch.float32) >= dropout_p
            xd2 = x2 * keep.to(x2.dtype) / (1.0 - dropout_p)
        fwd = lora_forward_triton if which == "triton" else lora_forward_torch
        y2, s = fwd(x2, weight, bias, A, B, scaling, xd2)
        # x itself is only needed for dW (when W is trainable); otherwise xd2 is enough.
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, xd2, keep, s, weight, A, B)
        ctx.scaling, ctx.p, ctx.which, ctx.x_shape = scaling, dropout_p, which, x.shape
        return y2.reshape(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xd2, keep, s, weight, A, B = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        if not dy2.is_contiguous():
            dy2 = dy2.contiguous()
        needs = ctx.needs_input_grad[:5]
        bwd = lora_backward_triton if ctx.which == "triton" else lora_backward_torch
        dx, dW, db, dA, dB = bwd(dy2, x2, xd2, keep, ctx.p, s, weight, A, B, ctx.scaling, needs)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, dW, db, dA, dB, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with a fused forward and backward.

    Shapes: x (..., K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r).
    """
    K = x.shape[-1]
    N = weight.shape[0]
    r = lora_A.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be (N, {K}) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if lora_A.shape != (r, K) or lora_B.shape != (N, r):
        raise ValueError(
            f"lora_A must be (r, {K}) and lora_B ({N}, r); got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    which = resolve(backend, x, weight, lora_A, lora_B, supported=True)
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), which)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, keep=None, dropout_p: float = 0.0):
    """Float64, unfused: the definition, for tests."""
    xd = x.double()
    y = xd @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    xa = xd if keep is None else xd * keep.double() / (1.0 - dropout_p)
    return y + scaling * (xa @ lora_A.double().t()) @ lora_B.double().t()
