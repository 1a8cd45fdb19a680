"""CorDA++ dynamic rank allocation under a budget of trainable parameters.

A layer of rank r costs r·(d_in + d_out). Every layer starts at its minimum
rank; then, repeatedly, the layer with the lowest score gets one more rank
step, as long as the step fits the budget. One heap entry per layer holds its
current score, so after the spectra are known the cost is
O((total steps + layers)·log layers), with O(1) scores from prefix sums.
"""

from __future__ import annotations

import heapq
import numbers
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ._targets import Targets, linear_weight
from .compactness import (
    IPM_SCORES,
    PI_FROM,
    PI_NORMALIZE,
    RankScorer,
    ScoreRule,
    analyse_layers,
    attach_cache,
    layer_log_pi,
)
from .covariance import Covariances
from .decompose import MODES, check_damping, positive_int, validate
from .rewrite import resolve_targets


class RankAllocation(dict):
    """Module name -> rank (a plain dict for ``build_corda(ranks=...)``) plus how it was reached.

    ``budget``: τ in parameters; ``used``: Σ r·(d_in + d_out); ``costs``: the
    per-rank cost d_in + d_out of each module; ``limits``: each module's
    (start, cap) rank; ``multiple``: the rank step.
    """

    def __init__(
        self,
        ranks: Mapping[str, int],
        *,
        budget: int,
        costs: Mapping[str, int],
        limits: Mapping[str, tuple[int, int]] | None = None,
        multiple: int = 1,
    ):
        """``ranks`` and each module's per-rank ``costs`` (both keyed by module name); ``used`` is computed."""
        super().__init__(ranks)
        missing = [n for n in self if n not in costs]
        if missing:
            raise ValueError(f"costs has no entry for module {missing[0]!r}")
        self.budget = int(budget)
        self.costs = {n: int(costs[n]) for n in self}
        self.used = sum(r * self.costs[n] for n, r in self.items())
        self.limits = dict(limits) if limits is not None else {n: (1, r) for n, r in self.items()}
        self.multiple = int(multiple)

    def table(self) -> str:
        """A text table of the allocation, one module per line, with totals."""
        width = max((len(n) for n in self), default=6)
        lines = [f"{'module':<{width}}  {'rank':>5}  {'params':>10}"]
        for name, r in self.items():
            lines.append(f"{name:<{width}}  {r:>5}  {r * self.costs[name]:>10}")
        lines.append(f"{'total':<{width}}  {sum(self.values()):>5}  {self.used:>10}  (budget {self.budget})")
        return "\n".join(lines)


def allocate_ranks(
    model: nn.Module,
    covs: Mapping[str, torch.Tensor],
    budget: int | float,
    mode: str = "kpm",
    min_rank: int = 1,
    max_rank: int | None = None,
    multiple: int = 1,
    *,
    rank: int = 16,
    targets: Targets = None,
    fill: bool = True,
    pi_from: str = "cov",
    pi_normalize: str = "mean",
    damping: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
    ipm_score: str = "captured",
    progress: bool = False,
    distributed: bool = False,
    keep_spectra: bool = True,
) -> RankAllocation:
    """Per-layer ranks whose total cost Σ r·(d_in + d_out) stays within ``budget``.

    ``budget``: an int number of trainable parameters, or a float in (0, 1]
    meaning that fraction of what uniform rank ``rank`` would cost. Ranks are
    multiples of ``multiple``, start at the smallest such multiple >= ``min_rank``
    and never exceed ``max_rank`` nor min(d_out, d_in). ``fill=True`` (default)
    keeps giving steps to the next-best layers that still fit once the best
    one no longer does, so the budget is missed by less than one step of the
    largest layer; ``fill=False`` stops at the first step that does not fit.
    ``ipm_score`` picks the IPM score (docs/cordapp.md §3): ``"captured"``
    (default) or ``"boundary"``. Spectra come from ``covs.spectrum_cache`` when
    valid, else are computed once and cached there for ``build_corda``.
    ``distributed=True`` (under torch.distributed) splits that spectrum work
    across ranks as ``build_corda(distributed=True)`` splits the decompositions;
    every rank gets the same allocation. ``keep_spectra=False`` keeps only the
    singular values (the allocation needs no more; ``build_corda`` then computes
    each adapter's r components itself, instead of holding a d×d float64 matrix
    of vectors per layer on the weights' device until the build).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_damping(damping)
    if pi_from not in PI_FROM:
        raise ValueError(f"pi_from must be one of {PI_FROM}, got {pi_from!r}")
    if pi_normalize not in PI_NORMALIZE:
        raise ValueError(f"pi_normalize must be one of {PI_NORMALIZE}, got {pi_normalize!r}")
    if ipm_score not in IPM_SCORES:
        raise ValueError(f"ipm_score must be one of {IPM_SCORES}, got {ipm_score!r}")
    min_rank = positive_int("min_rank", min_rank)
    multiple = positive_int("multiple", multiple)
    rank = positive_int("rank", rank)
    if max_rank is not None:
        max_rank = positive_int("max_rank", max_rank)
        if max_rank < min_rank:
            raise ValueError(f"max_rank ({max_rank}) must be >= min_rank ({min_rank})")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be an int (parameters) or a float in (0, 1] (fraction), got {budget!r}")
    budget = int(budget) if isinstance(budget, numbers.Integral) else float(budget)
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(
            f"a float budget is a fraction of the uniform-rank budget and must be in (0, 1], got {budget}; "
            "pass an int for a number of parameters"
        )
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget must be >= 1 parameter, got {budget}")

    def checks():
        modules = resolve_targets(model, covs, targets)
        if not modules:
            raise ValueError("no target module to allocate ranks to")
        if isinstance(covs, Covariances):
            covs.check_model(modules)
        for name, module in modules.items():  # a plain dict gets the same named checks as build_corda's
            if name not in covs:
                raise ValueError(f"no covariance for module {name!r}")
            validate(linear_weight(module), covs[name], 1, mode, name=name)
        return modules

    from .distributed import checked_on_every_rank

    modules = checked_on_every_rank("allocate_ranks' checks", checks, enabled=distributed)
    infos = analyse_layers(
        modules,
        covs,
        damping=damping,
        compute_dtype=compute_dtype,
        need_stats=pi_from == "cov",
        progress=progress,
        distributed=distributed,
        keep_vectors=keep_spectra,
    )
    if not keep_spectra:  # also those an earlier step (CorDA++ selection) left in the cache
        attach_cache(covs).drop_vectors(modules)
    rule = ScoreRule(mode=mode, pi_from=pi_from, pi_normalize=pi_normalize)

    names = list(modules)
    costs = [infos[n].d_in + infos[n].d_out for n in names]
    full = [min(infos[n].d_in, infos[n].d_out) for n in names]
    if isinstance(budget, float):
        tau = int(budget * sum(min(rank, f) * c for f, c in zip(full, costs)))
    else:
        tau = budget
    start = -(-min_rank // multiple) * multiple
    caps = [(min(f, max_rank) if max_rank is not None else f) // multiple * multiple for f in full]
    for name, cap, f in zip(names, caps, full):
        if start > cap:
            raise ValueError(
                f"module {name!r} cannot take rank {start} (min_rank={min_rank} rounded up to a multiple of "
                f"{multiple}): its largest allowed rank is {cap} (min(d_out, d_in) = {f}"
                + (f", max_rank = {max_rank})" if max_rank is not None else ")")
                + "; lower min_rank/multiple, or leave that module out (targets=), e.g. an MoE router"
            )
    ranks = [start] * len(names)
    used = sum(start * c for c in costs)
    if used > tau:
        raise ValueError(
            f"budget {tau} parameters is too small: starting every layer at rank {start} already costs {used} "
            f"(largest layer: {names[costs.index(max(costs))]!r}, {max(costs)} per rank)"
        )

    scorers = [
        RankScorer(
            layer_log_pi(infos[n].d_out, infos[n].values, infos[n].stats, rule), infos[n].values, mode, ipm_score
        )
        for n in names
    ]
    negative = [n for n, sc in zip(names, scorers) if sc.log_pi < 0]
    if negative:
        warnings.warn(
            f"log π < 0 for module(s) {negative[:3]} (pi_normalize='none' and large activations): their scores "
            "change sign, so more rank makes them look better; pi_normalize='mean' avoids this",
            stacklevel=2,
        )
    # (score, index): equal scores go to the earlier layer, so the result is deterministic.
    heap = [(scorers[i](ranks[i]), i) for i in range(len(names)) if ranks[i] + multiple <= caps[i]]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        step = multiple * costs[i]
        if used + step > tau:
            if not fill:
                break
            continue  # the budget only shrinks: this layer can never take another step
        ranks[i] += multiple
        used += step
        if ranks[i] + multiple <= caps[i]:
            heapq.heappush(heap, (scorers[i](ranks[i]), i))

    if all(r == cap for r, cap in zip(ranks, caps)) and used < tau:
        warnings.warn(
            f"the budget ({tau} parameters) is more than the layers can take: every one is at its largest "
            f"allowed rank, for {used} parameters"
            + (
                " (in KPM a full-rank adapter leaves a residual of about 0: nothing is kept frozen)"
                if mode == "kpm"
                else ""
            )
            + "; lower the budget or set max_rank",
            stacklevel=2,
        )
    out = RankAllocation(
        dict(zip(names, ranks)),
        budget=tau,
        costs=dict(zip(names, costs)),
        limits={n: (start, cap) for n, cap in zip(names, caps)},
        multiple=multiple,
    )
    return out
