"""CorDA++ dynamic covariance selection: per group, the candidate with the lowest score.

The choice itself is made while collecting (:mod:`corda_kernels.candidates`),
because only the best candidate's matrix survives the stream. This function
checks the model, confirms the requested rule picks the same winners, and
returns them as a :class:`Covariances` carrying the winners' spectra.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict

from torch import nn

from ._targets import Targets, linear_weight
from .candidates import CovarianceCandidates
from .compactness import SpectrumCache
from .covariance import Covariances
from .rewrite import resolve_targets


def select_covariances(
    model: nn.Module,
    cands: CovarianceCandidates,
    rank: int | None = None,
    mode: str | None = None,
    *,
    sum_over: str | None = None,
    group_score: str | None = None,
    pi_from: str | None = None,
    pi_normalize: str | None = None,
    targets: Targets = None,
) -> Covariances:
    """The selected covariance of every group (lowest score s(C) among the rounds).

    Arguments left as ``None`` keep the rule the candidates were scored with
    at collection. A different rule is re-evaluated from the stored spectra;
    if it would pick another round for some group, that round's matrix is
    gone, so this raises and names the group: pass the rule to
    ``collect_cov(..., candidates=N, ...)`` instead. ``rank`` and ``mode`` only
    matter for ``sum_over="adapter"``. The result carries the winners'
    spectra, which ``allocate_ranks`` and ``build_corda`` reuse.
    """
    if not isinstance(cands, CovarianceCandidates):
        raise TypeError(
            "cands must be the CovarianceCandidates returned by collect_cov(..., candidates=N), "
            f"got {type(cands).__name__}"
        )
    rule = cands.rule.merged(
        sum_over=sum_over, rank=rank, mode=mode, group_score=group_score, pi_from=pi_from, pi_normalize=pi_normalize
    )
    if rule.affects_ranking() != cands.rule.affects_ranking():
        if rule.pi_from == "cov" and cands.rule.pi_from != "cov":
            raise ValueError(
                'pi_from="cov" needs the covariance eigenvalues, which were not computed during collection '
                f'(pi_from={cands.rule.pi_from!r}): pass pi_from="cov" to collect_cov'
            )
        rescored = cands.rescore(rule)
        for gi, row in enumerate(rescored):
            scores = [(s, k) for k, s in enumerate(row) if s is not None]
            winner = min(scores)[1]
            if winner != cands.chosen[gi]:
                raise ValueError(
                    f"under {_describe(rule)} group {list(cands.groups[gi])} would select round {winner}, but the "
                    f"candidates were collected with {_describe(cands.rule)}, which kept round {cands.chosen[gi]} "
                    "and discarded the others: pass these options to collect_cov(..., candidates=N)"
                )
    covs = cands.selected
    modules = resolve_targets(model, covs, targets)
    covs.check_model(modules)
    cache = getattr(covs, "spectrum_cache", None)
    if isinstance(cache, SpectrumCache):
        stale = [
            name
            for name, module in modules.items()
            if cands._weight_keys.get(name)
            != SpectrumCache.key(linear_weight(module), covs[name], cands.damping, cands.compute_dtype)
        ]
        if stale:
            warnings.warn(
                f"the weights of module(s) {stale[:3]}{' and more' if len(stale) > 3 else ''} changed (or moved) "
                "since the candidates were scored: the selection used the old weights, and their cached spectra "
                "will not be reused",
                stacklevel=2,
            )
    covs.meta["selection"] = json.dumps({**asdict(rule), "damping": cands.damping})
    return covs


def _describe(rule) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in asdict(rule).items())
    return f"ScoreRule({fields})"
