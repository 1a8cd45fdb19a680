"""Context-oriented SVD: W·C_d = UΣVᵀ, so W = UΣ(VᵀC_d⁻¹).

Pipeline stage 2: (weight, covariance) -> adapter factors (A, B).

How it is computed, and why it differs from the textbook route:
the adapter only needs the r selected singular triplets, and
VᵣᵀC_d⁻¹ = UᵣᵀW/σᵣ exactly (because Vᵣ = C_dWᵀUᵣ/σᵣ). So when d_out <= d_in we
eigendecompose the small Gram matrix (W·C_d)(W·C_d)ᵀ in float64 and never
solve with C_d at all; when d_out > d_in we eigendecompose (W·C_d)ᵀ(W·C_d)
and get Uᵣ = W·C_d·Vᵣ/σᵣ; IPM's leading components then use the same
identity, while KPM's tail components (and IPM's at the rounding floor) solve
for VᵣᵀC_d⁻¹ with the Cholesky factor of C_d: each route is the more accurate
one for its components.
There is no explicit inverse anywhere. Forming the Gram matrix squares the condition
number, which is why it is formed and decomposed in float64: its absolute
eigenvalue error (~1e-16·σ_max²) is below what an fp32 SVD achieves on the
tail components that KPM keeps.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from dataclasses import dataclass

import torch

from .ops._backend import full_fp32_matmul

MODES = ("kpm", "ipm")

#: The damping is doubled at most this many times when C_d is not numerically
#: positive definite (Cholesky fails). PEFT's loop has no bound.
MAX_DAMPING_DOUBLINGS = 8

SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class DampedCovariance:
    """C_d = C + damping·mean(diag C)·I and its Cholesky factor, shared by every module of a group."""

    matrix: torch.Tensor
    cholesky: torch.Tensor
    damping: float


@dataclass
class Spectrum:
    """Singular values of W·C_d (descending) and the matching vectors of its smaller side.

    A full spectrum holds all min(d_out, d_in) components. A partial one
    (from :func:`selected_spectrum`) holds only components ``offset ..
    offset + len`` of the descending order, out of ``total``.
    """

    singular_values: torch.Tensor  # float64, (k,)
    vectors: torch.Tensor  # float64: U (d_out, k) if side == "left", V (d_in, k) if "right"; columns descending
    side: str
    damping: float
    scale: float = 0.0  # ‖W·C_d‖_F: a floor reference that needs no σ_max
    offset: int = 0
    total: int | None = None

    @property
    def complete(self) -> bool:
        return self.offset == 0 and (self.total is None or self.total == self.singular_values.numel())

    def take(self, rank: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(σ, vectors, indices) of the components the adapter gets: IPM the top r, KPM the bottom r."""
        total = self.singular_values.numel() if self.total is None else self.total
        idx = select(total, rank, mode)
        local = idx - self.offset
        if int(local[0]) < 0 or int(local[-1]) >= self.singular_values.numel():
            raise ValueError(
                f"this partial spectrum holds components {self.offset}.. but {mode} rank {rank} needs {idx[0]}.."
            )
        return self.singular_values[local], self.vectors[:, local.to(self.vectors.device)], idx


@dataclass
class Decomposition:
    """Result of :func:`context_svd`.

    ``A`` (r, d_in), ``B`` (d_out, r), ``residual`` (d_out, d_in, the weight's
    dtype), ``singular_values`` (all of them, descending), ``indices`` (which
    components became the adapter), and the ``damping`` that was used.
    """

    A: torch.Tensor
    B: torch.Tensor
    residual: torch.Tensor
    singular_values: torch.Tensor
    indices: torch.Tensor
    mode: str
    rank: int
    scaling: float
    damping: float


def _label(name: str | None) -> str:
    return f" of module {name!r}" if name else ""


def check_damping(damping) -> None:
    """The damping argument of every entry point: a finite number >= 0 (checked before any work)."""
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real) or not 0.0 <= damping < math.inf:
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")


def damp_covariance(
    cov: torch.Tensor, damping: float = 0.01, *, dtype: torch.dtype = torch.float32, name: str | None = None
) -> DampedCovariance:
    """Damp ``cov`` until it has a Cholesky factor (at most ``MAX_DAMPING_DOUBLINGS`` doublings)."""
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov{_label(name)} must be a square (d_in, d_in) matrix, got {tuple(cov.shape)}")
    if not cov.is_floating_point():
        raise TypeError(f"cov{_label(name)} must be a floating-point tensor, got {cov.dtype}")
    check_damping(damping)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64, got {dtype}")
    # Two d×d matrices at most (C_d and its factor): at d = 11008 each is 0.46 GiB in fp32, and the
    # plain expression (a copy, c + cᵀ, an identity, δ·I, their sum) held twice as many.
    c = cov.to(dtype)
    c = torch.add(c, c.T).mul_(0.5)
    md = float(c.diagonal().mean())
    if not torch.isfinite(c).all() or not math.isfinite(md):
        raise ValueError(f"cov{_label(name)} contains NaN or Inf")
    if md <= 0.0:
        raise ValueError(
            f"cov{_label(name)} is zero or has a non-positive mean diagonal (no tokens reached this layer?): "
            "cannot decompose"
        )
    diag = c.diagonal().clone()
    delta = damping
    for _ in range(MAX_DAMPING_DOUBLINGS + 1):
        c.diagonal().copy_(diag + delta * md)  # C + δ·md·I, in place: every try starts from C's own diagonal
        chol, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0:
            return DampedCovariance(c, chol, delta)
        del chol
        delta = max(2.0 * delta, 1e-6)
    raise ValueError(
        f"cov{_label(name)} is not positive definite even with damping {delta / 2:g} "
        f"(started at {damping:g}, doubled {MAX_DAMPING_DOUBLINGS} times): is it a covariance?"
    )


def _gram(weight: torch.Tensor, damped: DampedCovariance) -> tuple[torch.Tensor, str, float]:
    w = weight.to(damped.matrix.dtype)
    with full_fp32_matmul():
        m = (w @ damped.matrix).double()
    d_out, d_in = m.shape
    gram, side = (m @ m.T, "left") if d_out <= d_in else (m.T @ m, "right")
    return gram, side, float(gram.diagonal().sum().clamp_min(0).sqrt())


def compute_spectrum(weight: torch.Tensor, damped: DampedCovariance, *, name: str | None = None) -> Spectrum:
    """All singular values and smaller-side singular vectors of W·C_d, via a float64 Gram eigendecomposition."""
    return _full_spectrum(weight, damped, name)


def spectrum_values(weight: torch.Tensor, damped: DampedCovariance, *, name: str | None = None) -> torch.Tensor:
    """The singular values of W·C_d alone (float64, descending): what scoring needs, without the vectors
    (LAPACK's values-only solver took 0.26x the time of the full one at d = 4096, 0.4x at 2048)."""
    gram, _, _ = _gram(weight, damped)
    sv = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)
    if not torch.isfinite(sv).all():
        raise ValueError(f"the decomposition{_label(name)} produced non-finite singular values")
    return sv


def _full_spectrum(weight: torch.Tensor, damped: DampedCovariance, name: str | None) -> Spectrum:
    gram, side, scale = _gram(weight, damped)
    evals, evecs = torch.linalg.eigh(gram)
    sv = evals.clamp_min(0).sqrt().flip(0)
    if not torch.isfinite(sv).all():
        raise ValueError(f"the decomposition{_label(name)} produced non-finite singular values")
    return Spectrum(sv, evecs.flip(1), side, damped.damping, scale)


def _subset_eigh():
    """scipy's MRRR eigensolver (LAPACK ?syevr) when installed: it computes only the eigenvectors asked for."""
    try:
        from scipy.linalg import eigh
    except ImportError:  # scipy is optional: the torch path computes every vector and slices
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return eigh

    def one_thread_eigh(*args, **kwargs):
        # scipy's OpenBLAS threads spin after each call and steal the cores from
        # torch's next matmul; single-threaded, the whole step measured ~30% faster.
        with threadpool_limits(1, user_api="blas"):
            return eigh(*args, **kwargs)

    return one_thread_eigh


def selected_spectrum(
    weight: torch.Tensor, damped: DampedCovariance, rank: int, mode: str, *, name: str | None = None
) -> Spectrum:
    """Only the r components the adapter needs (a partial :class:`Spectrum`).

    On the CPU with scipy installed (the ``fast`` extra) this asks LAPACK's
    MRRR solver for just those r eigenpairs of the Gram matrix, about 2x cheaper
    than a full eigendecomposition at d = 512; otherwise it computes everything
    and slices.
    """
    gram, side, scale = _gram(weight, damped)
    n = gram.shape[0]
    eigh = _subset_eigh() if gram.device.type == "cpu" and 2 * rank <= n else None
    if eigh is None:
        full = _full_spectrum(weight, damped, name)
        sig, vec, idx = full.take(rank, mode)
        return Spectrum(sig, vec, side, damped.damping, scale, offset=int(idx[0]), total=n)
    lo, hi = (0, rank - 1) if mode == "kpm" else (n - rank, n - 1)  # ascending eigenvalue order
    evals, evecs = eigh(gram.numpy(), subset_by_index=[lo, hi], driver="evr", check_finite=False)
    sig = torch.from_numpy(evals).clamp_min(0).sqrt().flip(0)
    if not torch.isfinite(sig).all():
        raise ValueError(f"the decomposition{_label(name)} produced non-finite singular values")
    return Spectrum(sig, torch.from_numpy(evecs).flip(1), side, damped.damping, scale, offset=n - 1 - hi, total=n)


def select(num: int, rank: int, mode: str) -> torch.Tensor:
    """Indices (into descending order) of the adapter's components: IPM the top r, KPM the bottom r."""
    return torch.arange(rank) if mode == "ipm" else torch.arange(num - rank, num)


def adapter_factors(
    weight: torch.Tensor,
    damped: DampedCovariance,
    spectrum: Spectrum,
    rank: int,
    mode: str,
    scaling: float = 1.0,
    dtype: torch.dtype | None = None,
    *,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, indices) such that scaling·B@A is the selected part of W's context-oriented decomposition."""
    sig, vec, idx = spectrum.take(rank, mode)
    # Clamping only rescales A against B (their product is unchanged); it keeps
    # exactly-zero singular values (rank-deficient W) from dividing by zero.
    reference = spectrum.scale or float(spectrum.singular_values.max())
    sig = sig.clamp_min(max(reference, 1e-300) * 1e-12)
    w = weight.double()
    if spectrum.side == "left":
        u = vec
        a = (u.T @ w) / (sig * scaling).sqrt().unsqueeze(1)
    else:
        u = (w @ damped.matrix.double() @ vec) / sig
        # VᵣᵀC_d⁻¹ two ways. Solving with C_d's factor amplifies V's rounding by cond(C_d) (IPM on a
        # 96x64 layer: 19% off); the identity UᵣᵀW/σᵣ divides W·C_d's rounding by σᵣ instead, which is
        # exact to rounding for IPM's leading components but not for KPM's tail, nor for σ at the
        # rounding floor of W·C_d (an IPM rank above W's numerical rank), where the solve stays better.
        solved = torch.cholesky_solve(vec, damped.cholesky.double()).T * (sig / scaling).sqrt().unsqueeze(1)
        if mode == "ipm":
            floor = math.sqrt(torch.finfo(damped.matrix.dtype).eps) * float(spectrum.singular_values.max())
            exact = (u.T @ w) / (sig * scaling).sqrt().unsqueeze(1)
            a = torch.where((sig >= floor).unsqueeze(1), exact, solved)
        else:
            a = solved
    b = u * (sig / scaling).sqrt()
    out = dtype or weight.dtype
    if out != torch.float64:
        # The A/B balance follows the covariance's scale (B ∝ √scale, A ∝ 1/√scale: B@A does
        # not change), so a covariance of raw sums over many tokens can push B past fp16's range.
        big = max(float(a.abs().max()), float(b.abs().max()))
        if not big < torch.finfo(out).max:
            # B ∝ 1/√scaling too: a tiny alpha (scaling = alpha/rank) can be the cause as well.
            raise ValueError(
                f"the adapter factors{_label(name)} reach {big:.3g}, beyond {out}'s range "
                f"({torch.finfo(out).max:.3g}): the covariance's scale and the scaling alpha/rank "
                f"(here {scaling:.3g}) set the A/B balance; collect with normalize='mean' (the default), "
                "keep alpha near the rank, or build on a float32 copy of the model"
            )
    return a.to(out), b.to(out), idx


def residual_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """weight − scaling·B@A, in fp32 (fp64 for fp64 weights), cast back to the weight's dtype."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with full_fp32_matmul():
        return torch.addmm(weight.to(acc), B.to(acc), A.to(acc), alpha=-scaling).to(weight.dtype)


class RankTooLarge(ValueError):
    """A rank above min(d_out, d_in) of a layer (``name``: None outside a model)."""

    def __init__(self, rank: int, name: str | None, shape: tuple[int, int]):
        self.rank, self.name, self.shape, self.limit = rank, name, tuple(shape), min(shape)
        # In a model, the usual culprit is a narrow layer the default targets include (an MoE router).
        hint = f"; give it a smaller rank (ranks={{{name!r}: r}}) or leave it out (targets=)" if name else ""
        super().__init__(f"rank {rank}{_label(name)} exceeds min(d_out, d_in) = {self.limit} for weight {shape}{hint}")

    def __reduce__(self):  # pickle and copy rebuild it from its fields, not from the message alone
        return type(self), (self.rank, self.name, self.shape)


def positive_int(what: str, value) -> int:
    """``value`` as an int >= 1, else a ValueError naming ``what``. operator.index takes numpy and
    0-d torch integers as well as int, but no float and (checked first) no bool."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return n


def validate(weight: torch.Tensor, cov: torch.Tensor, rank: int, mode: str, name: str | None = None) -> int:
    """Shape, rank, mode and dtype checks; raise naming the argument (and the module, if given).
    Returns the rank as a plain int."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight{_label(name)} must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_WEIGHT_DTYPES:
        raise TypeError(
            f"weight{_label(name)} has dtype {weight.dtype}; CorDA needs float32, float16, bfloat16 or float64 "
            "(dequantize first)"
        )
    d_out, d_in = weight.shape
    if cov.dim() != 2 or tuple(cov.shape) != (d_in, d_in):
        raise ValueError(
            f"cov{_label(name)} must be ({d_in}, {d_in}) for a weight of shape {tuple(weight.shape)}, "
            f"got {tuple(cov.shape)}"
        )
    r = positive_int(f"rank{_label(name)}", rank)
    if r > min(d_out, d_in):
        raise RankTooLarge(r, name, tuple(weight.shape))
    return r


def context_svd(
    weight: torch.Tensor,
    cov: torch.Tensor,
    rank: int,
    mode: str = "kpm",
    *,
    scaling: float = 1.0,
    damping: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
    adapter_dtype: torch.dtype | None = None,
) -> Decomposition:
    """Context-oriented SVD of ``weight`` (d_out, d_in) under input covariance ``cov``.

    KPM puts the r *smallest* components in the adapter, IPM the r largest.
    With s = Σᵣ/scaling: B = Uᵣ√s, A = √s(VᵀC_d⁻¹)ᵣ, and the residual is
    ``weight − scaling·B@A`` so that the layer is unchanged. ``compute_dtype``
    is the dtype of W·C_d and the damping's Cholesky (float64 on request);
    the Gram eigendecomposition is always float64. With the default fp32, W·C_d's
    rounding (~1e-7 of its norm) bounds how well components far below σ_max are
    resolved: a KPM adapter whose σ are ~2e-5·σ_max comes out to a few 1e-3, against
    ~1e-7 with float64 (which took 1.1-1.5x as long on the 2-core dev CPU, d <= 1376).
    ``damping`` δ: C_d = C + δ·mean(diag C)·I, doubled (from 0: 1e-6) while C_d has no
    Cholesky factor, with a warning, at most 8 times. ``adapter_dtype``: that of A and
    B (default: the weight's); the residual keeps the weight's dtype.
    """
    rank = validate(weight, cov, rank, mode)
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    w = weight.detach()
    damped = damp_covariance(cov.detach().to(w.device), damping, dtype=compute_dtype)
    if damped.damping != damping:
        warnings.warn(
            f"context_svd: the damping was raised from {damping:g} to {damped.damping:g} to make C_d positive "
            "definite (a rank-deficient covariance); Decomposition.damping holds the value used",
            stacklevel=2,
        )
    spec = compute_spectrum(w, damped)
    A, B, idx = adapter_factors(w, damped, spec, rank, mode, scaling, adapter_dtype)
    return Decomposition(
        A=A,
        B=B,
        residual=residual_weight(w, A, B, scaling),
        singular_values=spec.singular_values.to(torch.float32),
        indices=idx,
        mode=mode,
        rank=rank,
        scaling=float(scaling),
        damping=damped.damping,
    )


def context_svd_reference(weight: torch.Tensor, cov: torch.Tensor, rank: int, mode: str, *, scaling=1.0, damping=0.01):
    """Float64 textbook route (full SVD, explicit solve) for tests: returns (A, B, singular_values)."""
    w = weight.double()
    c = cov.double()
    c = c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    u, s, vh = torch.linalg.svd(w @ c, full_matrices=False)
    idx = select(s.numel(), rank, mode)
    v_cinv = torch.linalg.solve(c, vh[idx].T).T  # c symmetric: (Vᵀ C⁻¹) = (C⁻¹ V)ᵀ
    sr = s[idx] / scaling
    return v_cinv * sr.sqrt().unsqueeze(1), u[:, idx] * sr.sqrt(), s
