"""``CordaLinear``: a frozen residual linear plus a trainable low-rank adapter.

Pipeline stage 3's building block. Its forward is ``ops.lora_linear``: a fused
Triton kernel on CUDA, ``addmm``-style torch calls elsewhere; B@A is never formed.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from ._targets import Conv1D, linear_weight, own_forward
from .decompose import context_svd, validate
from .ops._backend import full_fp32_matmul
from .ops.lora import autocast_dtype


class CordaLinear(nn.Module):
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with W, b frozen and A, B trainable.

    ``weight`` (out, in) and ``bias`` keep ``nn.Linear``'s names and shapes;
    ``lora_A`` is (r, in), ``lora_B`` (out, r) and ``scaling = alpha / r``.
    ``base_type`` remembers whether the original was ``nn.Linear`` or a
    transformers ``Conv1D`` so :meth:`merge` can give the same type back.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        alpha: float | None = None,
        dropout: float = 0.0,
        base_type: str = "linear",
        mode: str = "kpm",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if base_type not in ("linear", "conv1d"):
            raise ValueError(f"base_type must be 'linear' or 'conv1d', got {base_type!r}")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **kw), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.alpha = float(rank if alpha is None else alpha)
        self.dropout = float(dropout)
        self.base_type = base_type
        self.mode = mode

    @property
    def scaling(self) -> float:
        """alpha / rank, derived so that setting ``alpha`` cannot leave it stale."""
        return self.alpha / self.rank

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        cov: torch.Tensor,
        rank: int,
        mode: str = "kpm",
        alpha: float | None = None,
        *,
        dropout: float = 0.0,
        damping: float = 0.01,
    ) -> CordaLinear:
        """Decompose ``linear`` (nn.Linear or Conv1D) with covariance ``cov`` and wrap the result."""
        if not isinstance(linear, (nn.Linear, Conv1D)) or isinstance(linear, CordaLinear):
            raise TypeError(f"from_linear needs an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        why = own_forward(linear)
        if why:
            raise TypeError(f"from_linear cannot wrap {why}")
        weight = linear_weight(linear).detach()
        rank = validate(weight, cov, rank, mode)
        scaling = (rank if alpha is None else alpha) / rank
        dec = context_svd(weight, cov.to(weight.device), rank, mode, scaling=scaling, damping=damping)
        return cls.from_factors(linear, dec.residual, dec.A, dec.B, alpha=alpha, dropout=dropout, mode=mode)

    @classmethod
    def from_factors(
        cls,
        linear: nn.Module,
        residual: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        *,
        alpha: float | None = None,
        dropout: float = 0.0,
        mode: str = "kpm",
    ) -> CordaLinear:
        """Build from an existing decomposition: dtype and device are the residual's (A and B must share
        them), the bias is ``linear``'s, cast to them. The layer holds ``residual`` itself (no copy of a
        large frozen weight) and copies of A and B, which training will change."""
        rank = A.shape[0]
        d_out, d_in = residual.shape
        if A.dim() != 2 or B.dim() != 2 or rank < 1 or A.shape[1] != d_in or tuple(B.shape) != (d_out, rank):
            raise ValueError(
                f"factors do not fit a ({d_out}, {d_in}) weight: A must be (r, {d_in}) and B ({d_out}, r) with "
                f"r >= 1, got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        for label, t in (("A", A), ("B", B)):
            if t.dtype != residual.dtype or t.device != residual.device:
                raise ValueError(
                    f"{label} is {t.dtype} on {t.device} but the residual is {residual.dtype} on {residual.device}: "
                    "give the factors in the residual's dtype and device"
                )
        layer = cls(
            d_in,
            d_out,
            rank,
            bias=linear.bias is not None,
            alpha=alpha,
            dropout=dropout,
            base_type="conv1d" if isinstance(linear, Conv1D) else "linear",
            mode=mode,
            device=residual.device,
            dtype=residual.dtype,
        )
        with torch.no_grad():
            layer.weight.data = residual.contiguous()
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        # A new module starts in training mode; an eval model must not start running adapter dropout.
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ through :func:`ops.lora_linear` (fused kernels on CUDA)."""
        p = self.dropout if self.training else 0.0
        if x.dtype != self.weight.dtype and autocast_dtype(x) is None:  # under autocast the op casts
            x = x.to(self.weight.dtype)
        return ops.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, dropout_p=p)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling·B@A in (out, in) layout, computed in fp32 and cast to the weight's dtype."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        with full_fp32_matmul():
            w = torch.addmm(self.weight.to(acc), self.lora_B.to(acc), self.lora_A.to(acc), alpha=self.scaling)
        return w.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain layer of the original type holding W + scaling·B@A."""
        w = self.merged_weight()
        # Built on the meta device: a freshly initialized weight would be allocated only to be replaced.
        with torch.device("meta"):
            if self.base_type == "conv1d":
                out = Conv1D(self.out_features, self.in_features)
            else:
                out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        grad = self.weight.requires_grad
        out.weight = nn.Parameter(w.t().contiguous() if self.base_type == "conv1d" else w, requires_grad=grad)
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=grad)
        elif self.base_type == "conv1d":  # Conv1D always has a bias; a zero one is equivalent
            out.bias = nn.Parameter(w.new_zeros(self.out_features), requires_grad=grad)
        return out.train(self.training)

    def extra_repr(self) -> str:
        """Sizes, rank, alpha, mode, bias and the base layer type, for ``print(model)``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, mode={self.mode}, bias={self.bias is not None}, base={self.base_type}"
            + (f", dropout={self.dropout}" if self.dropout else "")
        )
