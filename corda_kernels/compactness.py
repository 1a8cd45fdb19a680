"""CorDA++ compactness metric π(C) and the two scores built on it.

π(C) = √(d_out·σ_max) / σ_min, σ the eigenvalues of the damped covariance
C_d = C + δ·mean(diag C)·I (or, with ``pi_from="wc"``, the singular values of
W·C_d). Lower π means more compact. On top of it:

* the selection score of a candidate covariance,
  s(C) = log π(C) · Σ_{i∈S} σᵢ(W·C_d) / σ_max(W·C_d);
* the allocation score of a layer at rank r (KPM),
  s = log π(C) · σ₋ᵣ / Σ_{k ≤ R−r} σ_k, and for IPM one of two readings
  (``IPM_SCORES``; see ``docs/cordapp.md``).

Everything here works from a :class:`~corda_kernels.decompose.Spectrum` that
is computed once per (layer, covariance) and kept in a :class:`SpectrumCache`,
so selection, allocation and ``build_corda`` never decompose a layer twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from . import decompose
from ._targets import linear_weight
from .decompose import DampedCovariance, Spectrum, damp_covariance

PI_FROM = ("cov", "wc")
PI_NORMALIZE = ("mean", "none")
SUM_OVER = ("all", "adapter")
GROUP_SCORE = ("sum", "max")
#: IPM allocation scores: "captured" (monotone in r) and "boundary" (the literal mirror of KPM's).
IPM_SCORES = ("captured", "boundary")

#: Relative floor for the smallest σ: keeps log π finite for an all-but-zero spectrum.
_SIGMA_FLOOR = 1e-12
#: With pi_from="wc", σ below this fraction of σ_max is rounding noise, not signal: W·C_d is
#: formed in fp32 by default and W itself is stored no more precisely, and the Gram route
#: resolves σ only to ~1e-8·σ_max even in float64. Flooring there makes a rank-deficient W's
#: log π a fixed number instead of a random one.
_WC_SIGMA_FLOOR = 1e-6


@dataclass(frozen=True)
class CovStats:
    """What π needs from a damped covariance: its smallest, largest and mean eigenvalue."""

    lam_min: float
    lam_max: float
    lam_mean: float


def cov_stats(damped: DampedCovariance) -> CovStats:
    """Eigenvalue extremes of C_d, in float64 (values only: no eigenvectors are formed)."""
    ev = torch.linalg.eigvalsh(damped.matrix.double())
    return CovStats(float(ev[0]), float(ev[-1]), float(ev.mean()))


def log_pi_from(d_out: int, s_min: float, s_max: float, s_mean: float, normalize: str = "mean") -> float:
    """log π = ½·log(d_out·σ_max) − log σ_min, after dividing σ by their mean if ``normalize="mean"``.

    Computed in logs so that no product overflows. An all-zero spectrum
    (a zero weight with ``pi_from="wc"``) carries no information: 0.
    """
    if normalize not in PI_NORMALIZE:
        raise ValueError(f"pi_normalize must be one of {PI_NORMALIZE}, got {normalize!r}")
    if not s_max > 0:
        return 0.0
    s_min = max(s_min, s_max * _SIGMA_FLOOR)
    out = 0.5 * (math.log(d_out) + math.log(s_max)) - math.log(s_min)
    if normalize == "mean":
        # π(C/m) = √m·π(C): dividing by the mean eigenvalue makes π, and so both scores, scale-free.
        out += 0.5 * math.log(s_mean)
    return out


@dataclass(frozen=True)
class ScoreRule:
    """How candidates are scored (selection) and how π is taken (selection and allocation).

    ``sum_over``: "all" R singular values, or only the r "adapter" ones
    (KPM: the r smallest, the tail; IPM: the r largest). ``group_score``:
    how the members of a shared-covariance group combine ("sum" or "max").
    ``pi_from``: eigenvalues of C_d ("cov") or singular values of W·C_d ("wc").
    ``pi_normalize``: divide σ by their mean first ("mean") or use them raw ("none").
    """

    sum_over: str = "all"
    rank: int | None = None
    mode: str = "kpm"
    group_score: str = "sum"
    pi_from: str = "cov"
    pi_normalize: str = "mean"

    def validate(self) -> ScoreRule:
        for arg, value, allowed in (
            ("sum_over", self.sum_over, SUM_OVER),
            ("mode", self.mode, decompose.MODES),
            ("group_score", self.group_score, GROUP_SCORE),
            ("pi_from", self.pi_from, PI_FROM),
            ("pi_normalize", self.pi_normalize, PI_NORMALIZE),
        ):
            if value not in allowed:
                raise ValueError(f"{arg} must be one of {allowed}, got {value!r}")
        if self.sum_over == "adapter":
            r = self.rank
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f'sum_over="adapter" needs rank= (a positive int), got rank={r!r}')
        return self

    def affects_ranking(self) -> tuple:
        """The fields that can change which candidate wins (rank and mode matter only for "adapter")."""
        if self.sum_over == "all":
            return (self.sum_over, self.group_score, self.pi_from, self.pi_normalize)
        return (self.sum_over, self.rank, self.mode, self.group_score, self.pi_from, self.pi_normalize)

    def merged(self, **overrides) -> ScoreRule:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()


def layer_log_pi(d_out: int, values: Sequence[float], stats: CovStats | None, rule: ScoreRule) -> float:
    """log π of one layer, from C_d's eigenvalue extremes or from its own singular values."""
    if rule.pi_from == "cov":
        if stats is None:
            raise ValueError('pi_from="cov" needs the covariance eigenvalues, which were not computed')
        return log_pi_from(d_out, stats.lam_min, stats.lam_max, stats.lam_mean, rule.pi_normalize)
    s_mean = math.fsum(values) / len(values)
    return log_pi_from(d_out, max(values[-1], values[0] * _WC_SIGMA_FLOOR), values[0], s_mean, rule.pi_normalize)


def selection_score_from(log_pi: float, values: Sequence[float], rule: ScoreRule) -> float:
    """s(C) = log π · Σ_{i∈S} σᵢ / σ_max with ``values`` descending; S per ``rule.sum_over``."""
    s_max = values[0]
    if not s_max > 0:
        return 0.0
    if rule.sum_over == "all":
        part = values
    else:
        r = min(rule.rank, len(values))
        part = values[len(values) - r :] if rule.mode == "kpm" else values[:r]
    return log_pi * math.fsum(part) / s_max


def group_score_from(member_scores: Sequence[float], how: str) -> float:
    return math.fsum(member_scores) if how == "sum" else max(member_scores)


class RankScorer:
    """O(1) allocation score of one layer at any rank, from prefix/suffix sums of its spectrum.

    KPM: s(r) = log π · σ_{R−r+1} / Σ_{k ≤ R−r} σ_k: the largest component the
    adapter would hold against the principal components that stay frozen.
    IPM, ``ipm_score="captured"``: s(r) = log π · Σ_{k ≤ r} σ_k / Σ_{k > r} σ_k,
    what the adapter holds against what stays frozen (increasing in r).
    IPM, ``ipm_score="boundary"``: s(r) = log π · σ_r / Σ_{k > r} σ_k, the KPM
    formula on the spectrum read from the other end. It usually *falls* with r,
    so the greedy keeps feeding whichever layer got ahead.
    """

    def __init__(self, log_pi: float, values: Sequence[float], mode: str, ipm_score: str = "captured"):
        if ipm_score not in IPM_SCORES:
            raise ValueError(f"ipm_score must be one of {IPM_SCORES}, got {ipm_score!r}")
        self.log_pi = log_pi
        self.values = list(values)
        self.mode = mode
        self.ipm_score = ipm_score
        self.prefix = [0.0]
        for v in self.values:
            self.prefix.append(self.prefix[-1] + v)
        # A separate suffix sum: P[R] − P[r] would cancel badly when the head dominates.
        self.suffix = [0.0]
        for v in reversed(self.values):
            self.suffix.append(self.suffix[-1] + v)
        self.suffix.reverse()  # suffix[j] = Σ_{k > j} σ_k (1-based k)

    def __call__(self, r: int) -> float:
        R = len(self.values)
        if not 1 <= r < R:
            raise ValueError(f"allocation score needs 1 <= r < R={R}, got r={r}")
        if self.mode == "kpm":
            num, den = self.values[R - r], self.prefix[R - r]
        elif self.ipm_score == "captured":
            num, den = self.prefix[r], self.suffix[r]
        else:
            num, den = self.values[r - 1], self.suffix[r]
        if not den > 0:
            return math.inf
        s = self.log_pi * num / den
        return math.inf if s != s else s


# ---------------------------------------------------------------------- convenience on tensors
def _analyse(weight: torch.Tensor, cov: torch.Tensor, damping: float, compute_dtype: torch.dtype):
    decompose.validate(weight, cov, 1, "kpm")  # shapes and dtypes, named
    w = weight.detach()
    damped = damp_covariance(cov.detach().to(w.device), damping, dtype=compute_dtype)
    spec = decompose.compute_spectrum(w, damped)
    return damped, spec.singular_values.cpu().tolist()


def compactness(
    cov: torch.Tensor,
    d_out: int | None = None,
    *,
    weight: torch.Tensor | None = None,
    damping: float = 0.01,
    pi_from: str = "cov",
    pi_normalize: str = "mean",
    compute_dtype: torch.dtype = torch.float32,
) -> float:
    """π(C) = √(d_out·σ_max)/σ_min of the damped ``cov``, σ first divided by their mean by default
    (lower = more compact).

    ``pi_from="wc"`` takes σ from W·C_d instead (needs ``weight``);
    ``pi_normalize="mean"`` (default) divides σ by their mean, which makes
    π independent of the activations' scale; ``"none"`` is the raw formula.
    Give ``d_out`` or ``weight`` (whose first dimension is d_out).
    """
    rule = ScoreRule(pi_from=pi_from, pi_normalize=pi_normalize).validate()
    if weight is not None:
        decompose.validate(weight, cov, 1, "kpm")
    if d_out is None:
        if weight is None:
            raise ValueError("compactness needs d_out= or weight=")
        d_out = weight.shape[0]
    else:
        d_out = decompose.positive_int("d_out", d_out)
    if weight is not None and d_out != weight.shape[0]:
        raise ValueError(f"d_out={d_out} but weight has {weight.shape[0]} output rows: give one of them")
    if pi_from == "wc":
        if weight is None:
            raise ValueError('pi_from="wc" needs weight=')
        _, values = _analyse(weight, cov, damping, compute_dtype)
        return math.exp(layer_log_pi(d_out, values, None, rule))
    stats = cov_stats(damp_covariance(cov.detach(), damping, dtype=compute_dtype))
    return math.exp(layer_log_pi(d_out, [], stats, rule))


def selection_score(
    weight: torch.Tensor,
    cov: torch.Tensor,
    *,
    sum_over: str = "all",
    rank: int | None = None,
    mode: str = "kpm",
    pi_from: str = "cov",
    pi_normalize: str = "mean",
    damping: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
) -> float:
    """Selection score of one layer's candidate covariance (lower is better)."""
    rule = ScoreRule(sum_over, rank, mode, "sum", pi_from, pi_normalize).validate()
    damped, values = _analyse(weight, cov, damping, compute_dtype)
    stats = cov_stats(damped) if pi_from == "cov" else None
    return selection_score_from(layer_log_pi(weight.shape[0], values, stats, rule), values, rule)


def rank_score(
    weight: torch.Tensor,
    cov: torch.Tensor,
    rank: int,
    mode: str = "kpm",
    *,
    pi_from: str = "cov",
    pi_normalize: str = "mean",
    damping: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
    ipm_score: str = "captured",
) -> float:
    """Allocation score of one layer at ``rank`` (the layer with the lowest score gets more rank)."""
    rule = ScoreRule(mode=mode, pi_from=pi_from, pi_normalize=pi_normalize).validate()
    rank = decompose.validate(weight, cov, rank, mode)
    damped, values = _analyse(weight, cov, damping, compute_dtype)
    stats = cov_stats(damped) if pi_from == "cov" else None
    return RankScorer(layer_log_pi(weight.shape[0], values, stats, rule), values, mode, ipm_score)(rank)


# ---------------------------------------------------------------------- the spectrum cache
def _fingerprint(t: torch.Tensor) -> tuple[float, ...]:
    # Writes through .data (or under a different view) bypass _version, so the content is summarized
    # too: float64 sums, squares, and row- and column-weighted sums, O(numel) and one host read.
    t = t.detach()
    if t.numel() == 0:
        return ()
    m = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    rows = m.sum(dim=1, dtype=torch.float64)
    cols = m.sum(dim=0, dtype=torch.float64)
    i = torch.arange(1, rows.numel() + 1, device=m.device, dtype=torch.float64)
    j = torch.arange(1, cols.numel() + 1, device=m.device, dtype=torch.float64)
    sq = torch.linalg.vector_norm(m, dtype=torch.float64)
    return tuple(torch.stack([rows.sum(), (rows * i).sum(), (cols * j).sum(), sq]).tolist())


def _tensor_key(t: torch.Tensor) -> tuple:
    # _version moves on every in-place write, data_ptr on re-allocation or a move to another device;
    # the fingerprint catches the writes that neither sees.
    return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device), _fingerprint(t))


class SpectrumCache:
    """Spectra of W·C_d and eigenvalue extremes of C_d computed for one ``Covariances`` object.

    Attached to that object as ``covs.spectrum_cache``; ``build_corda`` picks it
    up. Every entry is keyed by the damping and compute dtype it was made with
    and by the identity *and version* of both the weight and the covariance
    tensor, and by a fingerprint of their contents, so an entry is silently
    ignored once a weight is modified (in place, through ``.data`` or
    otherwise), replaced or moved, or the damping differs.
    """

    def __init__(self) -> None:
        self._values: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._spectra: dict[str, tuple[tuple, Spectrum]] = {}
        self._stats: dict[tuple, CovStats] = {}

    def __repr__(self) -> str:
        return f"SpectrumCache({len(self._values)} layers, {len(self._spectra)} with vectors)"

    def drop_vectors(self, names=None) -> None:
        """Free the singular vectors of ``names`` (default: all); their singular values stay."""
        for name in list(self._spectra) if names is None else names:
            self._spectra.pop(name, None)

    @staticmethod
    def key(weight: torch.Tensor, cov: torch.Tensor, damping: float, compute_dtype: torch.dtype) -> tuple:
        return (float(damping), compute_dtype, _tensor_key(weight), _tensor_key(cov))

    def put(
        self,
        name: str,
        weight: torch.Tensor,
        cov: torch.Tensor,
        damping: float,
        compute_dtype: torch.dtype,
        spectrum: Spectrum,
        keep_vectors: bool = True,
    ) -> None:
        k = self.key(weight, cov, damping, compute_dtype)
        self._values[name] = (k, spectrum.singular_values.detach().to("cpu", torch.float64))
        if keep_vectors:
            self._spectra[name] = (k, spectrum)
        else:
            self._spectra.pop(name, None)

    def put_values(
        self,
        name: str,
        weight: torch.Tensor,
        cov: torch.Tensor,
        damping: float,
        compute_dtype: torch.dtype,
        values: Sequence[float],
    ) -> None:
        """Singular values only: enough for the scores, not for ``build_corda``."""
        k = self.key(weight, cov, damping, compute_dtype)
        self._values[name] = (k, torch.as_tensor(values, dtype=torch.float64, device="cpu"))
        self._spectra.pop(name, None)

    def values(
        self, name: str, weight: torch.Tensor, cov: torch.Tensor, damping: float, compute_dtype: torch.dtype
    ) -> torch.Tensor | None:
        """The singular values (CPU float64, descending) if the entry still matches, else None."""
        e = self._values.get(name)
        return e[1] if e is not None and e[0] == self.key(weight, cov, damping, compute_dtype) else None

    def spectrum(
        self, name: str, weight: torch.Tensor, cov: torch.Tensor, damping: float, compute_dtype: torch.dtype
    ) -> Spectrum | None:
        """The full spectrum if the entry still matches and kept its vectors, else None."""
        e = self._spectra.get(name)
        return e[1] if e is not None and e[0] == self.key(weight, cov, damping, compute_dtype) else None

    def put_stats(self, cov: torch.Tensor, damping: float, compute_dtype: torch.dtype, stats: CovStats) -> None:
        self._stats[(float(damping), compute_dtype, _tensor_key(cov))] = stats

    def stats(self, cov: torch.Tensor, damping: float, compute_dtype: torch.dtype) -> CovStats | None:
        return self._stats.get((float(damping), compute_dtype, _tensor_key(cov)))

    def lookup(
        self,
        modules: Mapping[str, torch.nn.Module],
        covs: Mapping[str, torch.Tensor],
        damping: float,
        compute_dtype: torch.dtype,
    ) -> dict[str, Spectrum]:
        """Name -> still-valid full spectrum, for ``build_corda(spectra=...)``."""
        out = {}
        for name, module in modules.items():
            if name in covs:
                spec = self.spectrum(name, linear_weight(module), covs[name], damping, compute_dtype)
                if spec is not None:
                    out[name] = spec
        return out


def attach_cache(covs) -> SpectrumCache:
    """The cache attached to ``covs``, creating it; a plain dict cannot carry one, so it gets a throwaway."""
    cache = getattr(covs, "spectrum_cache", None)
    if isinstance(cache, SpectrumCache):
        return cache
    cache = SpectrumCache()
    try:
        covs.spectrum_cache = cache
    except AttributeError:
        pass
    return cache


@dataclass
class LayerInfo:
    """Per layer, what the scores need: shape, singular values of W·C_d (descending), C_d's extremes."""

    d_out: int
    d_in: int
    values: list[float]
    stats: CovStats | None


def analyse_layers(
    modules: Mapping[str, torch.nn.Module],
    covs: Mapping[str, torch.Tensor],
    *,
    damping: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
    need_stats: bool = True,
    keep_vectors: bool = True,
    progress: bool = False,
    distributed: bool = False,
) -> dict[str, LayerInfo]:
    """Spectra (and covariance extremes) of every module, from the cache on ``covs`` or computed once and cached.

    ``distributed=True`` (under torch.distributed): each rank analyses the covariance groups
    ``build_corda(distributed=True)`` will give it, and the results are exchanged, so every rank
    returns every layer's info while each computed only its share (its cache keeps its share's
    vectors for the build, and the others' singular values).
    """
    cache = attach_cache(covs)
    by_cov: dict[int, list[str]] = {}
    for name in modules:
        by_cov.setdefault(id(covs[name]), []).append(name)
    groups = list(by_cov.values())
    if distributed:
        from .distributed import assign_groups, exchange, is_active, rank_and_world

        if not is_active():
            raise RuntimeError("distributed=True needs an initialized torch.distributed process group")
        rank, world = rank_and_world()
        groups = [g for g, owner in zip(groups, assign_groups(modules, groups, world)) if owner == rank]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(map(len, groups)), desc="spectra", unit="layer", leave=False)
    out: dict[str, LayerInfo] = {}
    error = None
    try:
        for group in groups:
            cov = covs[group[0]]
            damped = None
            stats = cache.stats(cov, damping, compute_dtype) if need_stats else None
            for name in group:
                w = linear_weight(modules[name])
                vals = cache.values(name, w, cov, damping, compute_dtype)
                if vals is None or (need_stats and stats is None):
                    if damped is None or damped.matrix.device != w.device:  # device_map may split a group
                        damped = damp_covariance(cov.detach().to(w.device), damping, dtype=compute_dtype, name=name)
                    if need_stats and stats is None:
                        stats = cov_stats(damped)
                        cache.put_stats(cov, damping, compute_dtype, stats)
                if vals is None:
                    wd = w.detach()
                    if not torch.isfinite(wd).all():
                        raise ValueError(f"weight of module {name!r} contains NaN or Inf")
                    if keep_vectors:
                        spec = decompose.compute_spectrum(wd, damped, name=name)
                        cache.put(name, w, cov, damping, compute_dtype, spec)
                    else:  # values only: the build computes its r components itself
                        values = decompose.spectrum_values(wd, damped, name=name)
                        cache.put_values(name, w, cov, damping, compute_dtype, values)
                    vals = cache.values(name, w, cov, damping, compute_dtype)
                d_out, d_in = w.shape
                out[name] = LayerInfo(int(d_out), int(d_in), vals.tolist(), stats)
                if bar is not None:
                    bar.update(1)
    except Exception as e:  # under distributed=True, raised on every rank by the exchange below
        if not distributed:
            raise
        error = e
    finally:
        if bar is not None:
            bar.close()
    if distributed:
        for part in exchange(out, error, "spectrum analysis"):
            for name, info in part.items():
                if name in out:
                    continue
                out[name] = info
                w, cov = linear_weight(modules[name]), covs[name]
                if cache.values(name, w, cov, damping, compute_dtype) is None:
                    cache.put_values(name, w, cov, damping, compute_dtype, info.values)
                if info.stats is not None and cache.stats(cov, damping, compute_dtype) is None:
                    cache.put_stats(cov, damping, compute_dtype, info.stats)
    return {name: out[name] for name in modules}
