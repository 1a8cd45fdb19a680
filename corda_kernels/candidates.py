"""CorDA++ dynamic covariance selection, streamed: one pass, N rounds, best-so-far per group.

``collect_cov(model, loader, candidates=N)`` lands here. The batches are split
into N *contiguous* rounds (contiguous, not round-robin, so that only one
running accumulator per group exists at a time). At the end of each round the
:class:`~corda_kernels.collect.Collector`'s accumulator of every group is
turned into a candidate covariance, scored, kept if it beats the best so far,
and zeroed. Peak memory per group: the accumulator, the best covariance so far
and one transient candidate, plus the best candidate's spectra.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import decompose, ops
from ._targets import Targets, built_hint, find_targets, linear_weight, weight_shape
from .collect import Collector, run_batches
from .compactness import (
    CovStats,
    ScoreRule,
    SpectrumCache,
    cov_stats,
    group_score_from,
    layer_log_pi,
    selection_score_from,
)
from .covariance import Covariances, weight_signatures
from .decompose import Spectrum, check_damping, damp_covariance, positive_int


@dataclass
class _Best:
    round: int
    score: float
    matrix: torch.Tensor
    count: int
    seqs: int
    spectra: dict[str, Spectrum]


class CovarianceCandidates:
    """Result of ``collect_cov(..., candidates=N)``: the per-group winners and every round's scores.

    Only the winning covariance of each group is kept (``selected``); for the
    others, the singular values of W·C_d and C_d's eigenvalue extremes are kept
    (vectors of floats, not matrices), so :func:`select_covariances` can
    re-score the rounds under another rule and tell whether the winners change.
    """

    def __init__(
        self,
        selected: Covariances,
        rule: ScoreRule,
        *,
        damping: float,
        compute_dtype: torch.dtype,
        round_batches: list[int],
        chosen: list[int],
        group_scores: list[list[float | None]],
        module_scores: dict[str, list[float | None]],
        values: dict[str, list[list[float] | None]],
        stats: list[list[CovStats | None]],
        weight_keys: dict[str, tuple],
    ):
        self.selected = selected
        self.rule = rule
        self.damping = damping
        self.compute_dtype = compute_dtype
        self.round_batches = round_batches
        self.chosen = chosen
        self.group_scores = group_scores
        self.module_scores = module_scores
        self._values = values
        self._stats = stats
        self._weight_keys = weight_keys

    @property
    def rounds(self) -> int:
        """Number of candidate rounds collected."""
        return len(self.round_batches)

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The shared-input groups, as in ``selected.groups``."""
        return self.selected.groups

    @property
    def chosen_round(self) -> dict[str, int]:
        """Module name -> index of the round whose covariance was selected."""
        return {name: self.chosen[gi] for gi, g in enumerate(self.groups) for name in g}

    def __repr__(self) -> str:
        return (
            f"CovarianceCandidates({len(self.selected)} modules in {len(self.groups)} groups, "
            f"{self.rounds} rounds of {self.round_batches} batches, sum_over={self.rule.sum_over!r})"
        )

    def rescore(self, rule: ScoreRule) -> list[list[float | None]]:
        """Group scores per round under ``rule``, from the stored spectra (no decomposition)."""
        out = []
        for gi, names in enumerate(self.groups):
            row = []
            for k in range(self.rounds):
                if self._values[names[0]][k] is None:
                    row.append(None)
                    continue
                row.append(_group_score(names, self.selected.shapes, self._values, self._stats[gi][k], k, rule)[0])
            out.append(row)
        return out

    def table(self) -> str:
        """One line per group: the members, each round's score, and the chosen round (*)."""
        lines = []
        for gi, names in enumerate(self.groups):
            cells = []
            for k, s in enumerate(self.group_scores[gi]):
                text = "-" if s is None else f"{s:.4g}"
                cells.append(f"{text}{'*' if k == self.chosen[gi] else ' '}")
            lines.append(f"{','.join(names)}: " + "  ".join(cells))
        return "\n".join(lines)


def _group_score(names, shapes, values, stats, k, rule: ScoreRule) -> tuple[float, dict[str, float]]:
    member = {}
    for name in names:
        vals = values[name][k]
        member[name] = selection_score_from(layer_log_pi(shapes[name][0], vals, stats, rule), vals, rule)
    score = group_score_from(list(member.values()), rule.group_score)
    return (math.inf if score != score else score), member


class _Rounds:
    """Closes rounds: turns accumulators into candidates, scores them, keeps the best per group."""

    def __init__(self, collector: Collector, rule: ScoreRule, damping, compute_dtype, keep_vectors, ends):
        self.c = collector
        self.rule = rule
        self.damping = damping
        self.compute_dtype = compute_dtype
        self.keep_vectors = keep_vectors
        self.ends = ends
        self.round = 0
        self.last_end = 0
        self.round_batches: list[int] = []
        self.best: list[_Best | None] = []
        self.group_scores: list[list[float | None]] = []
        self.module_scores: dict[str, list[float | None]] = {}
        self.values: dict[str, list[list[float] | None]] = {}
        self.stats: list[list[CovStats | None]] = []
        self.negative: set[str] = set()

    def on_batch(self, n: int) -> None:
        if self.round < len(self.ends) and n == self.ends[self.round]:
            self.close(n)

    def _candidate(self, g, k: int) -> tuple[torch.Tensor | None, int, int]:
        count, seqs = int(g.count.item()), int(g.seqs.item())
        if count == 0:
            return None, 0, 0
        c = ops.covariance_result(g.acc)
        # Same scaling as Collector.finish, so a selected candidate is a drop-in Covariances entry.
        if self.c.normalize == "mean":
            c /= count
        elif self.c.normalize == "peft" and seqs > 0:
            c /= seqs
        if not torch.isfinite(c).all():
            raise ValueError(
                f"non-finite activations (NaN/Inf) reached module(s) {g.names} in candidate round {k}; check the "
                "model's dtype and the calibration data"
            )
        if not float(c.diagonal().sum()) > 0:
            # Rows that were all zero: no candidate, as if no row had come (plain collection would keep a
            # zero matrix, which build_corda then refuses).
            return None, 0, 0
        return c, count, seqs

    def close(self, n: int) -> None:
        k = self.round
        self.round_batches.append(n - self.last_end)
        self.last_end = n
        self.round += 1
        for gi, g in enumerate(self.c.groups):
            while len(self.best) <= gi:
                self.best.append(None)
                self.group_scores.append([None] * k)
                self.stats.append([None] * k)
            for name in g.names:
                self.values.setdefault(name, [None] * k)
                self.module_scores.setdefault(name, [None] * k)
            c, count, seqs = self._candidate(g, k)
            if c is None:
                self._record_missing(gi, g.names)
            else:
                try:
                    self._score(gi, g.names, c, count, seqs, k)
                except ValueError as e:
                    raise ValueError(f"candidate round {k}: {e}") from e
            g.acc.zero_()
            g.count.zero_()
            g.seqs.zero_()

    def _record_missing(self, gi, names) -> None:
        self.group_scores[gi].append(None)
        self.stats[gi].append(None)
        for name in names:
            self.values[name].append(None)
            self.module_scores[name].append(None)

    def _score(self, gi, names, c, count, seqs, k) -> None:
        modules = self.c.modules
        w0 = linear_weight(modules[names[0]])
        damped = damp_covariance(c.to(w0.device), self.damping, dtype=self.compute_dtype, name=names[0])
        stats = cov_stats(damped) if self.rule.pi_from == "cov" else None
        # Scores need singular values only; the vectors are formed only when kept for the build. (Forming
        # them once at the end, for the winning round alone, measured slower: the Gram matrices of W·C_d,
        # not the eigensolver, dominate a round, and they would be computed again.)
        spectra = {}
        for name in names:
            w = linear_weight(modules[name]).detach()
            if not torch.isfinite(w).all():
                raise ValueError(f"weight of module {name!r} contains NaN or Inf")
            if w.device != damped.matrix.device:  # device_map split this group: work on the member's device
                damped = damp_covariance(c.to(w.device), self.damping, dtype=self.compute_dtype, name=name)
            if self.keep_vectors:
                spectra[name] = decompose.compute_spectrum(w, damped, name=name)
                sv = spectra[name].singular_values
            else:
                sv = decompose.spectrum_values(w, damped, name=name)
            self.values[name].append(sv.to("cpu", torch.float64).tolist())
        shapes = {name: weight_shape(modules[name]) for name in names}
        score, member = _group_score(names, shapes, self.values, stats, k, self.rule)
        if self.rule.pi_normalize == "none":
            self.negative.update(
                n for n in names if layer_log_pi(shapes[n][0], self.values[n][k], stats, self.rule) < 0
            )
        self.group_scores[gi].append(score)
        self.stats[gi].append(stats)
        for name in names:
            self.module_scores[name].append(member[name])
        best = self.best[gi]
        # Strictly lower: on a tie the earlier round stays, so the result is deterministic.
        if best is None or score < best.score:
            self.best[gi] = _Best(k, score, c, count, seqs, spectra)


def plan_rounds(loader, candidates: int, max_batches: int | None, round_batches: int | None) -> list[int]:
    """Cumulative batch count at the end of each round."""
    candidates = positive_int("candidates (the number of rounds)", candidates)
    if round_batches is not None:
        round_batches = positive_int("round_batches", round_batches)
        if max_batches is not None:
            raise ValueError("pass either max_batches= or round_batches=, not both")
        return [(k + 1) * round_batches for k in range(candidates)]
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")
    try:
        n = len(loader)
    except TypeError:
        n = None
    if max_batches is not None:
        n = max_batches if n is None else min(n, max_batches)
    if n is None:
        raise ValueError(
            "the loader has no len(), so it cannot be split into candidate rounds: pass max_batches= (split "
            "into `candidates` contiguous rounds) or round_batches= (batches per round)"
        )
    if n == 0:
        raise ValueError("the calibration loader yielded no batch: collect_cov needs at least one")
    if n < candidates:
        raise ValueError(f"candidates={candidates} needs at least {candidates} batches, but the loader has {n}")
    return [(k + 1) * n // candidates for k in range(candidates)]


def collect_candidates(
    model: nn.Module,
    loader: Iterable,
    candidates: int = 4,
    *,
    targets: Targets = None,
    normalize: str = "mean",
    accum_dtype: torch.dtype = torch.float32,
    device=None,
    max_batches: int | None = None,
    progress: bool = True,
    backend: str = "auto",
    round_batches: int | None = None,
    sum_over: str = "all",
    rank: int | None = None,
    mode: str = "kpm",
    group_score: str = "sum",
    pi_from: str = "cov",
    pi_normalize: str = "mean",
    damping: float = 0.01,
    compute_dtype: torch.dtype = torch.float32,
    keep_spectra: bool = True,
) -> CovarianceCandidates:
    """Stream ``loader`` once in ``candidates`` contiguous rounds; keep each group's lowest-score covariance.

    Rounds split ``len(loader)`` (capped by ``max_batches``) as evenly as
    possible; a loader without ``len()`` needs ``max_batches`` or
    ``round_batches``. Scoring options: see :class:`~corda_kernels.compactness.ScoreRule`.
    ``keep_spectra=False`` keeps only singular values (less memory; ``build_corda``
    then decomposes the winners again).
    """
    rule = ScoreRule(sum_over, rank, mode, group_score, pi_from, pi_normalize).validate()
    check_damping(damping)
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    ends = plan_rounds(loader, candidates, max_batches, round_batches)
    modules = find_targets(model, targets)
    if not modules:
        raise ValueError(f"the model has no nn.Linear or Conv1D target to collect covariances for{built_hint(model)}")
    if rule.sum_over == "adapter":
        # A layer narrower than the rank (an MoE router) is scored over all its components, which is what
        # the full-width adapter its build will need (ranks={name: width}) takes; a rank no layer can
        # have is a typo, and would turn every score into sum_over="all" without a word.
        widths = {name: min(weight_shape(module)) for name, module in modules.items()}
        narrow = sorted(n for n, w in widths.items() if rule.rank > w)
        if len(narrow) == len(widths):
            raise ValueError(
                f"rank {rule.rank} (sum_over='adapter') exceeds min(d_out, d_in) of every target "
                f"(the widest allows {max(widths.values())}): give the rank the build will use"
            )
        if narrow:
            warnings.warn(
                f"rank {rule.rank} (sum_over='adapter') exceeds min(d_out, d_in) of {len(narrow)} module(s) "
                f"(e.g. {narrow[0]!r}: {widths[narrow[0]]}): they are scored over all their components, as a "
                "full-width adapter (ranks={name: width} at build) would take",
                stacklevel=3,
            )
    collector = Collector(modules, normalize=normalize, accum_dtype=accum_dtype, device=device, backend=backend)
    rounds = _Rounds(collector, rule, damping, compute_dtype, keep_spectra, ends)
    n = run_batches(
        model,
        loader,
        collector,
        max_batches=ends[-1],
        progress=progress,
        desc="candidate rounds",
        on_batch=rounds.on_batch,
    )
    if n == 0:
        raise ValueError("the calibration loader yielded no batch: collect_cov needs at least one")
    missing = [name for name in modules if name not in collector.group_of]
    if missing:
        raise ValueError(
            f"{len(missing)} target module(s) never ran during collection (e.g. {missing[:3]}; MoE experts no token "
            "was routed to are skipped by some models): CorDA++ selection needs a covariance for each, so leave "
            "them out (targets=) or collect on more data"
        )
    if n > rounds.last_end:  # the loader ran out inside a round: that partial round is a candidate too
        rounds.close(n)
    if rounds.round < candidates:
        warnings.warn(
            f"the loader ended after {n} batches: only {rounds.round} of {candidates} candidate rounds were collected",
            stacklevel=3,
        )
    if rounds.negative:
        warnings.warn(
            f"log π < 0 for module(s) {sorted(rounds.negative)[:3]} (pi_normalize='none' and large activations): "
            "their scores change sign; pi_normalize='mean' avoids this",
            stacklevel=3,
        )
    collector.warn_unmasked(stacklevel=3)
    return _assemble(collector, rounds, rule, damping, compute_dtype, n, candidates)


def _assemble(collector, rounds: _Rounds, rule, damping, compute_dtype, n, candidates) -> CovarianceCandidates:
    groups = [g.names for g in collector.groups]
    for gi, names in enumerate(groups):
        if rounds.best[gi] is None:
            raise ValueError(
                f"module(s) {names} counted no token, or read only all-zero inputs, in every round: cannot "
                "select a covariance; leave them out (targets=)"
            )
    best = [b for b in rounds.best if b is not None]
    shapes = {name: weight_shape(collector.modules[name]) for names in groups for name in names}
    chosen = [b.round for b in best]
    covs = Covariances(
        [b.matrix for b in best],
        groups,
        token_counts=[b.count for b in best],
        normalize=collector.normalize,
        shapes=shapes,
        signatures=weight_signatures({name: collector.modules[name] for name in shapes}),
        sequences=best[0].seqs if collector.normalize == "peft" else None,
        meta={
            "batches": str(n),
            "candidates": str(candidates),
            "round_batches": json.dumps(rounds.round_batches),
            "selected_rounds": json.dumps(chosen),
        },
    )
    cache = SpectrumCache()
    weight_keys = {}
    for gi, names in enumerate(groups):
        b = best[gi]
        stats = rounds.stats[gi][b.round]
        if stats is not None:
            cache.put_stats(b.matrix, damping, compute_dtype, stats)
        for name in names:
            w = linear_weight(collector.modules[name])
            weight_keys[name] = SpectrumCache.key(w, b.matrix, damping, compute_dtype)
            spec = b.spectra.get(name)
            if spec is None:
                cache.put_values(name, w, b.matrix, damping, compute_dtype, rounds.values[name][b.round])
            else:
                cache.put(name, w, b.matrix, damping, compute_dtype, spec)
    covs.spectrum_cache = cache
    # Pad rounds a group was absent from at the end (a group first seen in a later round is padded at the start).
    width = len(rounds.round_batches)
    for row in rounds.group_scores:
        row.extend([None] * (width - len(row)))
    for row in rounds.stats:
        row.extend([None] * (width - len(row)))
    for d in (rounds.values, rounds.module_scores):
        for row in d.values():
            row.extend([None] * (width - len(row)))
    return CovarianceCandidates(
        covs,
        rule,
        damping=damping,
        compute_dtype=compute_dtype,
        round_batches=rounds.round_batches,
        chosen=chosen,
        group_scores=rounds.group_scores,
        module_scores=rounds.module_scores,
        values=rounds.values,
        stats=rounds.stats,
        weight_keys=weight_keys,
    )
