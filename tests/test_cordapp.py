"""CorDA++: compactness metric, streamed covariance selection, budgeted rank allocation.

Every expected value is computed here from the definitions (eigvalsh / svdvals
in float64, a rescanning greedy), independently of ``corda_kernels.compactness``.
"""

import copy
import importlib
import math
import warnings

import pytest
import torch
from tiny import padded_batches, rel, tiny_llama
from torch import nn

import corda_kernels as ck
from corda_kernels._targets import weight_shape

cp = importlib.import_module("corda_kernels.compactness")  # ck.compactness is the function
DAMP = 0.01


# ---------------------------------------------------------------------- references from the definitions
def ref_damped(c, damping=DAMP):
    c = c.double()
    c = (c + c.T) / 2
    return c + damping * c.diagonal().mean() * torch.eye(c.shape[0], dtype=torch.float64)


def ref_pi(c, d_out, damping=DAMP, normalize="mean"):
    cd = ref_damped(c, damping)
    if normalize == "mean":
        cd = cd / (cd.trace() / cd.shape[0])
    ev = torch.linalg.eigvalsh(cd)
    return math.sqrt(d_out * float(ev[-1])) / float(ev[0])


def ref_sv(w, c, damping=DAMP):
    return torch.linalg.svdvals(w.double() @ ref_damped(c, damping)).tolist()


def ref_selection(w, c, sum_over="all", rank=None, mode="kpm"):
    sv = ref_sv(w, c)
    part = sv if sum_over == "all" else (sv[-rank:] if mode == "kpm" else sv[:rank])
    return math.log(ref_pi(c, w.shape[0])) * sum(part) / sv[0]


def ref_rank_score(log_pi, sv, r, mode, ipm_score="captured"):
    R = len(sv)
    if mode == "kpm":  # σ₋ᵣ over the R−r principal components
        return log_pi * sv[R - r] / sum(sv[: R - r])
    if ipm_score == "captured":  # what the adapter holds over what stays frozen
        return log_pi * sum(sv[:r]) / sum(sv[r:])
    return log_pi * sv[r - 1] / sum(sv[r:])


def spectrum_cov(lams, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(lams), len(lams), generator=g, dtype=torch.float64))
    return (q * torch.tensor(lams, dtype=torch.float64)) @ q.T


def low_rank_cov(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(d, k, generator=g, dtype=torch.float64)
    return f @ f.T


# ---------------------------------------------------------------------- π and the scores
@pytest.mark.parametrize("normalize", ["mean", "none"])
def test_pi_matches_hand_formula_on_known_spectrum(normalize):
    lams = [9.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.125]
    c = spectrum_cov(lams)
    d_out = 5
    m = sum(lams) / len(lams)
    lmax, lmin, mean_d = lams[0] + DAMP * m, lams[-1] + DAMP * m, m * (1 + DAMP)
    expected = math.sqrt(d_out * lmax) / lmin * (math.sqrt(mean_d) if normalize == "mean" else 1.0)
    got = ck.compactness(c, d_out, pi_normalize=normalize)
    assert got == pytest.approx(expected, rel=1e-6)


def test_scoring_functions_name_their_bad_arguments():
    from corda_kernels.compactness import rank_score, selection_score

    torch.manual_seed(0)
    x = torch.randn(100, 8)
    c, w = x.T @ x / 100, torch.randn(6, 8)
    for bad in (0, -3, True, 6.5):
        with pytest.raises(ValueError, match=rf"d_out must be a positive int, got {bad!r}"):
            ck.compactness(c, bad)
    with pytest.raises(ValueError, match=r"d_out=5 but weight has 6 output rows"):
        ck.compactness(c, 5, weight=w)
    for f in (lambda: ck.compactness(c, weight=w[:, :5]), lambda: selection_score(w[:, :5], c)):
        with pytest.raises(ValueError, match=r"cov must be \(5, 5\) for a weight of shape \(6, 5\), got \(8, 8\)"):
            f()
    with pytest.raises(ValueError, match="rank 7"):
        rank_score(w, c, 7)
    assert ck.compactness(c, 6) == ck.compactness(c, weight=w) == ck.compactness(c, 6, weight=w)


def test_pi_from_wc_uses_singular_values_of_w_cd():
    torch.manual_seed(0)
    w = torch.randn(6, 8, dtype=torch.float64)
    c = spectrum_cov([4.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.2, 0.1])
    sv = ref_sv(w, c)
    mean = sum(sv) / len(sv)
    expected = math.sqrt(6 * sv[0] / mean) / (sv[-1] / mean)
    assert ck.compactness(c, weight=w, pi_from="wc") == pytest.approx(expected, rel=1e-6)
    # σ from W·C_d is a different quantity from σ of C: the option must change the value.
    assert abs(ck.compactness(c, weight=w) - expected) > 1e-3 * expected


def test_pi_from_wc_floors_a_rank_deficient_weight_at_a_fixed_level():
    # A duplicated column gives W an exact null vector; its computed σ_min is rounding noise
    # (~1e-8·σ_max), so without a floor log π would change from seed to seed.
    got = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(24, 16, generator=g)
        w[:, 1] = w[:, 0]
        c = spectrum_cov([1.0 + 0.2 * i for i in range(16)], seed=seed)
        sv = ref_sv(w, c)
        mean = sum(sv) / len(sv)
        floor = 1e-6 * sv[0]
        assert sv[-1] < 1e-3 * floor  # the true σ_min is far below the floor
        want = 0.5 * math.log(24 * sv[0] / mean) - math.log(floor / mean)
        got.append(math.log(ck.compactness(c.float(), weight=w, pi_from="wc")))
        assert got[-1] == pytest.approx(want, rel=1e-4)


def test_scores_and_choice_are_scale_invariant():
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=torch.float64)
    c_low = low_rank_cov(16, 3) + 1e-3 * torch.eye(16, dtype=torch.float64)
    c_iso = spectrum_cov([1.0 + 0.1 * i for i in range(16)], seed=1)
    for c in (c_low, c_iso):
        base = cp.selection_score(w, c)
        assert base == pytest.approx(ref_selection(w, c), rel=1e-5)
        for alpha in (1e-4, 37.0, 1e5):
            assert cp.selection_score(w, alpha * c) == pytest.approx(base, rel=1e-5)
            assert cp.selection_score(alpha * w, c) == pytest.approx(base, rel=1e-5)
            # The KPM tail is where fp32 W·C_d rounds most: check the exact invariance in float64.
            f64 = {"compute_dtype": torch.float64}
            assert cp.rank_score(w, alpha * c, 3, **f64) == pytest.approx(cp.rank_score(w, c, 3, **f64), rel=1e-8)
        # The raw formula is not scale-free: π(αC) = π(C)/√α.
        assert ck.compactness(100.0 * c, 12, pi_normalize="none") == pytest.approx(
            ck.compactness(c, 12, pi_normalize="none") / 10.0, rel=1e-5
        )
    # The choice between two candidates does not depend on how each one happens to be scaled
    # (e.g. rounds of different sizes under normalize="sum").
    pick = min((cp.selection_score(w, c), i) for i, c in enumerate((c_low, c_iso)))[1]
    for a, b in ((1e3, 1e-3), (1e-3, 1e3), (5.0, 0.2)):
        assert min((cp.selection_score(w, c), i) for i, c in enumerate((a * c_low, b * c_iso)))[1] == pick


def test_low_rank_input_layer_ranked_as_expected():
    torch.manual_seed(0)
    w = torch.randn(12, 16, dtype=torch.float64)
    c_low = low_rank_cov(16, 2)
    c_iso = torch.eye(16, dtype=torch.float64)
    # Ill-conditioned input: less compact (larger π) ...
    assert ck.compactness(c_low, 12) > 10 * ck.compactness(c_iso, 12)
    assert ck.compactness(c_iso, 12) == pytest.approx(math.sqrt(12), rel=1e-6)
    # ... which outweighs its concentrated W·C_d spectrum: as a candidate it loses (log π ≈ 7 vs ½·log 12) ...
    assert cp.selection_score(w, c_low) > cp.selection_score(w, c_iso)
    assert cp.selection_score(w, c_low) == pytest.approx(ref_selection(w, c_low), rel=1e-5)
    # ... and its tail carries almost nothing, so KPM gives it rank first; IPM, the mirror, does not.
    assert cp.rank_score(w, c_low, 2, "kpm") < cp.rank_score(w, c_iso, 2, "kpm")
    assert cp.rank_score(w, c_low, 2, "ipm") > cp.rank_score(w, c_iso, 2, "ipm")
    for c in (c_low, c_iso):
        lp = math.log(ref_pi(c, 12))
        sv = ref_sv(w, c)
        for r in (1, 2, 5, 11):
            for mode in ("kpm", "ipm"):
                assert cp.rank_score(w, c, r, mode) == pytest.approx(ref_rank_score(lp, sv, r, mode), rel=1e-4)
            got = cp.rank_score(w, c, r, "ipm", ipm_score="boundary")
            assert got == pytest.approx(ref_rank_score(lp, sv, r, "ipm", "boundary"), rel=1e-4)


# ---------------------------------------------------------------------- streamed selection
class Toy(nn.Module):
    """q and k read the same tensor (one shared covariance group); o reads another."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 12)
        self.k = nn.Linear(16, 8)
        self.o = nn.Linear(12, 16)

    def forward(self, x):
        h = self.q(x)
        self.k(x)
        return self.o(torch.tanh(h))


def round_batches(per_round=2, seed=0):
    """Four rounds with very different input statistics, ``per_round`` batches each."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(2, 16, generator=g)
    scales = torch.logspace(0, 2, 16)
    out = []
    for k in range(4):
        for _ in range(per_round):
            z = torch.randn(3, 10, 16, generator=g)
            if k == 1:
                z = z[..., :2] @ basis + 0.01 * z  # nearly rank 2
            elif k == 2:
                z = 100.0 * z + 5.0
            elif k == 3:
                z = z * scales
            out.append(z)
    return out


def reference_round_scores(model, batches, per_round, rule):
    groups = [("q", "k"), ("o",)]
    scores, mats = [], []
    for k in range(len(batches) // per_round):
        covs = ck.collect_cov(model, batches[k * per_round : (k + 1) * per_round], progress=False)
        mats.append({n: covs[n] for n in ("q", "k", "o")})
        row = []
        for group in groups:
            member = [ref_selection(getattr(model, n).weight.detach(), covs[n], **rule) for n in group]
            row.append(sum(member))
        scores.append(row)
    return groups, scores, mats


@pytest.mark.parametrize(
    "rule", [{}, {"sum_over": "adapter", "rank": 3, "mode": "kpm"}, {"sum_over": "adapter", "rank": 2, "mode": "ipm"}]
)
def test_selection_keeps_lowest_score_candidate_per_group(rule):
    model = Toy()
    batches = round_batches()
    cands = ck.collect_cov(model, batches, candidates=4, progress=False, **rule)
    assert isinstance(cands, ck.CovarianceCandidates)
    assert cands.round_batches == [2, 2, 2, 2]
    groups, ref, mats = reference_round_scores(model, batches, 2, rule)
    assert [tuple(g) for g in cands.groups] == groups
    for gi, group in enumerate(groups):
        got = cands.group_scores[gi]
        for k in range(4):
            assert got[k] == pytest.approx(ref[k][gi], rel=1e-4)
        want = min(range(4), key=lambda k: ref[k][gi])
        assert cands.chosen[gi] == want
        covs = ck.select_covariances(model, cands, **{k: v for k, v in rule.items() if k in ("rank", "mode")})
        for name in group:
            torch.testing.assert_close(covs[name], mats[want][name], rtol=1e-6, atol=0)
    if not rule:  # the rounds differ by construction: the near-rank-2 round wins the shared q/k group
        assert cands.chosen[0] == 1
    assert covs["q"] is covs["k"]  # still one shared matrix


def test_selection_streams_in_one_pass_and_holds_one_matrix_per_group():
    model = Toy()
    batches = round_batches()
    iters = []

    class Once:
        def __iter__(self):
            iters.append(1)
            return iter(batches)

    cands = ck.collect_cov(model, Once(), candidates=4, max_batches=8, progress=False)
    assert len(iters) == 1
    assert len(cands.selected.matrices()) == len(cands.groups) == 2
    assert cands.round_batches == [2, 2, 2, 2]
    # Only vectors of floats are kept for the losing rounds, never their matrices.
    big = [t for t in cands.__dict__.values() if isinstance(t, torch.Tensor) and t.dim() == 2]
    assert not big


def test_select_rescoring_under_another_rule():
    model = Toy()
    batches = round_batches()
    cands = ck.collect_cov(model, batches, candidates=4, progress=False)
    assert ck.select_covariances(model, cands) is cands.selected
    for rank in (1, 3, 8):
        _, ref, _ = reference_round_scores(model, batches, 2, {"sum_over": "adapter", "rank": rank, "mode": "kpm"})
        want = [min(range(4), key=lambda k: ref[k][gi]) for gi in range(2)]
        if want == cands.chosen:
            ck.select_covariances(model, cands, rank=rank, sum_over="adapter")
        else:
            with pytest.raises(ValueError, match="would select round"):
                ck.select_covariances(model, cands, rank=rank, sum_over="adapter")


def test_select_warns_when_weights_changed_since_scoring():
    model = Toy()
    cands = ck.collect_cov(model, round_batches(), candidates=2, progress=False)
    with torch.no_grad():
        model.o.weight.mul_(1.001)  # a change within the weight signature's tolerance
    with pytest.warns(UserWarning, match="'o'"):
        covs = ck.select_covariances(model, cands)
    assert "o" not in covs.spectrum_cache.lookup(dict(model.named_modules()), covs, DAMP, torch.float32)
    with pytest.raises(TypeError, match="CovarianceCandidates"):
        ck.select_covariances(model, cands.selected)
    with torch.no_grad():
        model.o.weight.add_(0.1)  # beyond it: these are other weights
    with pytest.raises(ValueError, match="'o' was collected on other weights"):
        ck.select_covariances(model, cands)


def test_raw_pi_warns_when_log_pi_turns_negative():
    model = Toy()
    batches = [1e4 * b for b in round_batches()]
    with pytest.warns(UserWarning, match="log π < 0"):
        ck.collect_cov(model, batches, candidates=2, progress=False, pi_normalize="none")
    covs = ck.collect_cov(model, batches, progress=False)
    with pytest.warns(UserWarning, match="log π < 0"):
        ck.allocate_ranks(model, covs, budget=600, pi_normalize="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.allocate_ranks(model, covs, budget=600)  # under the 864 that full ranks would take


def test_group_score_max_option():
    model = Toy()
    batches = round_batches()
    cands = ck.collect_cov(model, batches, candidates=4, progress=False, group_score="max")
    for k in range(4):
        q, kk = cands.module_scores["q"][k], cands.module_scores["k"][k]
        assert cands.group_scores[0][k] == pytest.approx(max(q, kk))


def test_candidate_round_planning_and_errors():
    model = Toy()
    batches = round_batches()
    with pytest.raises(ValueError, match="candidates"):
        ck.collect_cov(model, batches, candidates=0, progress=False)
    with pytest.raises(ValueError, match="candidates"):
        ck.collect_cov(model, batches, candidates=True, progress=False)
    with pytest.raises(ValueError, match="at least 9 batches"):
        ck.collect_cov(model, batches, candidates=9, progress=False)
    with pytest.raises(ValueError, match="no batch"):
        ck.collect_cov(model, [], candidates=2, progress=False)
    with pytest.raises(ValueError, match="no len"):
        ck.collect_cov(model, iter(batches), candidates=2, progress=False)
    with pytest.raises(TypeError, match="only with candidates"):
        ck.collect_cov(model, batches, progress=False, sum_over="adapter")
    with pytest.raises(ValueError, match="rank="):
        ck.collect_cov(model, batches, candidates=2, progress=False, sum_over="adapter")
    with pytest.raises(TypeError):
        ck.collect_cov(model, batches, candidates=2, progress=False, no_such_option=1)
    # Uneven split: contiguous rounds as even as possible.
    assert ck.collect_cov(model, batches[:7], candidates=3, progress=False).round_batches == [2, 2, 3]
    # A generator with round_batches: the short last round is a candidate; a missing round is warned about.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = ck.collect_cov(model, iter(batches[:7]), candidates=3, round_batches=3, progress=False)
    assert c.round_batches == [3, 3, 1]
    with pytest.warns(UserWarning, match="only 2 of 3"):
        c = ck.collect_cov(model, iter(batches[:5]), candidates=3, round_batches=3, progress=False)
    assert c.round_batches == [3, 2]


# ---------------------------------------------------------------------- allocation
class TwoBranch(nn.Module):
    """Two same-shape layers; ``a`` sees a nearly rank-2 input, ``b`` an isotropic one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        return self.a(x[..., :16]) + self.b(x[..., 16:])


def two_branch_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(2, 16, generator=g)
    out = []
    for _ in range(n):
        z = torch.randn(4, 8, 18, generator=g)
        low = z[..., :2] @ basis + 1e-3 * torch.randn(4, 8, 16, generator=g)
        out.append(torch.cat([low, z[..., 2:]], dim=-1))
    return out


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_allocation_favours_the_layer_the_metric_favours(mode):
    model = TwoBranch()
    covs = ck.collect_cov(model, two_branch_batches(), progress=False)
    ranks = ck.allocate_ranks(model, covs, budget=16 * 32, mode=mode)
    assert sum(ranks.values()) == 16 and ranks.used == 16 * 32
    # KPM disturbs the tail, which the near-rank-2 input never excites: it goes there. IPM's adapter
    # holds the head, which the near-rank-2 input concentrates: "a" captures more per rank.
    if mode == "kpm":
        assert ranks["a"] >= 12 > ranks["b"]
    else:
        assert ranks["b"] > ranks["a"]


def test_a_rank_allocation_built_by_hand_has_its_totals():
    # A user's own allocation (for build_corda(ranks=) and .table()) gets the same fields.
    r = ck.RankAllocation({"a": 2, "b": 4}, budget=100, costs={"a": 10, "b": 12})
    assert dict(r) == {"a": 2, "b": 4} and r.used == 68 and r.multiple == 1
    assert r.table().splitlines()[-1].split()[:3] == ["total", "6", "68"]
    with pytest.raises(ValueError, match="costs has no entry for module 'b'"):
        ck.RankAllocation({"a": 2, "b": 4}, budget=100, costs={"a": 10})


def naive_allocation(infos, tau, mode, start, caps, m, ipm_score="captured"):
    """Rescan every layer at every step: the specification, without the heap."""
    names = list(infos)
    ranks = dict.fromkeys(names, start)
    used = sum(start * (infos[n][0] + infos[n][1]) for n in names)
    alive = {n for n in names if start + m <= caps[n]}
    while alive:
        best = min(
            alive,
            key=lambda n: (ref_rank_score(infos[n][2], infos[n][3], ranks[n], mode, ipm_score), names.index(n)),
        )
        step = m * (infos[best][0] + infos[best][1])
        if used + step > tau:
            alive.discard(best)
            continue
        ranks[best] += m
        used += step
        if ranks[best] + m > caps[best]:
            alive.discard(best)
    return ranks, used


@pytest.fixture(scope="module")
def llama_covs():
    torch.manual_seed(0)
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128, n_batches=3), progress=False)
    return model, covs


@pytest.mark.parametrize(
    "mode,budget,min_rank,max_rank,multiple,ipm_score",
    [
        ("kpm", 9000, 1, None, 1, "captured"),
        ("ipm", 9000, 1, None, 1, "captured"),
        ("ipm", 9000, 1, None, 1, "boundary"),
        ("kpm", 12000, 2, 8, 2, "captured"),
        ("kpm", 0.8, 1, None, 4, "captured"),
    ],
)
def test_allocation_matches_rescanning_greedy_and_bounds(
    llama_covs, mode, budget, min_rank, max_rank, multiple, ipm_score
):
    model, covs = llama_covs
    ranks = ck.allocate_ranks(
        model,
        covs,
        budget=budget,
        mode=mode,
        min_rank=min_rank,
        max_rank=max_rank,
        multiple=multiple,
        rank=8,
        ipm_score=ipm_score,
    )
    named = dict(model.named_modules())
    infos, caps = {}, {}
    for name in covs:
        w = named[name].weight.detach()
        d_out, d_in = w.shape
        sv = covs.spectrum_cache.values(name, named[name].weight, covs[name], DAMP, torch.float32).tolist()
        # The cached spectrum is the definition's, to fp32 rounding of W·C_d.
        ref = ref_sv(w, covs[name])
        assert max(abs(a - b) for a, b in zip(sv, ref)) < 1e-4 * ref[0]
        infos[name] = (d_in, d_out, math.log(ref_pi(covs[name], d_out)), sv)
        caps[name] = min(min(d_in, d_out), max_rank or 10**9) // multiple * multiple
    costs = {n: infos[n][0] + infos[n][1] for n in infos}
    tau = budget if isinstance(budget, int) else int(budget * sum(8 * c for c in costs.values()))
    start = -(-min_rank // multiple) * multiple
    want, used = naive_allocation(infos, tau, mode, start, caps, multiple, ipm_score)
    assert dict(ranks) == want
    assert ranks.used == used == sum(r * costs[n] for n, r in ranks.items())
    assert ranks.budget == tau
    # The bound: never above τ, below it by less than one step of the largest layer.
    assert used <= tau
    assert not all(ranks[n] == caps[n] for n in ranks)
    assert tau - used < multiple * max(costs.values())
    for n, r in ranks.items():
        assert r % multiple == 0 and max(min_rank, 1) <= r <= caps[n]
    assert len(set(ranks.values())) > 1  # not a uniform allocation


def test_ipm_captured_score_rises_with_rank_and_spreads_the_budget(llama_covs):
    model, covs = llama_covs
    named = dict(model.named_modules())
    for name in covs:
        sv = covs.spectrum_cache.values(name, named[name].weight, covs[name], DAMP, torch.float32).tolist()
        scorer = cp.RankScorer(1.0, sv, "ipm", "captured")
        scores = [scorer(r) for r in range(1, len(sv))]
        assert all(b > a for a, b in zip(scores, scores[1:])), name
    # The literal mirror usually falls with r, so its greedy hands most of the budget to a few
    # layers; the captured score, like KPM's, rises, and the greedy spreads the budget.
    captured = ck.allocate_ranks(model, covs, budget=1.0, rank=8, mode="ipm")
    boundary = ck.allocate_ranks(model, covs, budget=1.0, rank=8, mode="ipm", ipm_score="boundary")
    assert sum(r > 1 for r in captured.values()) == len(captured)
    assert max(captured.values()) < 2 * 8
    assert sum(r == 1 for r in boundary.values()) >= len(boundary) // 2
    with pytest.raises(ValueError, match="ipm_score"):
        ck.allocate_ranks(model, covs, budget=1.0, mode="ipm", ipm_score="mirror")


def test_allocation_is_deterministic_with_or_without_cache(llama_covs):
    model, covs = llama_covs
    a = ck.allocate_ranks(model, covs, budget=12000)
    fresh = ck.Covariances(covs.matrices(), covs.groups, token_counts=[covs.tokens] * len(covs.groups))
    b = ck.allocate_ranks(model, fresh, budget=12000)
    c = ck.allocate_ranks(model, fresh, budget=12000)
    assert dict(a) == dict(b) == dict(c)


def test_allocation_uses_a_heap_not_a_rescan(llama_covs, monkeypatch):
    model, covs = llama_covs
    ck.allocate_ranks(model, covs, budget=20000)  # spectra cached
    calls = []
    orig = cp.RankScorer.__call__
    monkeypatch.setattr(cp.RankScorer, "__call__", lambda self, r: calls.append(r) or orig(self, r))
    ranks = ck.allocate_ranks(model, covs, budget=20000)
    steps = sum(r - 1 for r in ranks.values())
    assert len(calls) <= steps + len(ranks)


class BigSmall(nn.Module):
    """A large layer on a nearly rank-2 input (KPM favours it) and a small one on an isotropic input."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(32, 32)
        self.small = nn.Linear(8, 8)

    def forward(self, x):
        return self.big(x[..., :32]).sum(-1) + self.small(x[..., 32:]).sum(-1)


def test_fill_keeps_placing_cheaper_steps_after_the_best_layer_stops_fitting():
    model = BigSmall()
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 32, generator=g)
    batches = []
    for _ in range(3):
        z = torch.randn(4, 8, 40, generator=g)
        low = z[..., :2] @ basis + 1e-3 * torch.randn(4, 8, 32, generator=g)
        batches.append(torch.cat([low, z[..., 32:]], dim=-1))
    covs = ck.collect_cov(model, batches, progress=False)
    tau = 80 + 64 * 5 + 40  # starting ranks, five big steps, then room for small steps only
    filled = ck.allocate_ranks(model, covs, budget=tau)
    literal = ck.allocate_ranks(model, covs, budget=tau, fill=False)
    assert filled["big"] == literal["big"] >= 6
    assert literal["small"] == 1 and literal.used + 64 > tau  # stopped at the big layer's step
    assert filled["small"] > 1 and literal.used < filled.used <= tau
    assert tau - filled.used < 16  # less than even the small layer's step is left
    infos = {}
    for name in ("big", "small"):
        w = getattr(model, name).weight.detach()
        infos[name] = (w.shape[1], w.shape[0], math.log(ref_pi(covs[name], w.shape[0])), ref_sv(w, covs[name]))
    want, _ = naive_allocation(infos, tau, "kpm", 1, {"big": 32, "small": 8}, 1)
    assert dict(filled) == want


def test_fill_option_and_argument_errors(llama_covs):
    model, covs = llama_covs
    filled = ck.allocate_ranks(model, covs, budget=9000, multiple=4)
    literal = ck.allocate_ranks(model, covs, budget=9000, multiple=4, fill=False)
    assert literal.used <= filled.used <= 9000
    assert all(literal[n] <= filled[n] for n in filled)
    cost = sum(c for c in filled.costs.values())
    with pytest.raises(ValueError, match="budget .* too small"):
        ck.allocate_ranks(model, covs, budget=cost - 1)
    ck.allocate_ranks(model, covs, budget=cost)  # exactly the starting ranks fit
    with pytest.raises(ValueError, match="k_proj"):
        ck.allocate_ranks(model, covs, budget=10**9, min_rank=40)  # k/v have d_out = 32
    with pytest.raises(ValueError, match="fraction"):
        ck.allocate_ranks(model, covs, budget=1.5)
    with pytest.raises(ValueError, match="max_rank"):
        ck.allocate_ranks(model, covs, budget=10**6, min_rank=4, max_rank=2)
    with pytest.raises(ValueError, match="multiple"):
        ck.allocate_ranks(model, covs, budget=10**6, multiple=0)
    with pytest.raises(TypeError, match="budget"):
        ck.allocate_ranks(model, covs, budget="1000")


def test_a_budget_larger_than_the_layers_can_take_is_warned_about(llama_covs):
    model, covs = llama_covs
    with pytest.warns(UserWarning, match=r"every one is at its largest allowed rank.*in KPM a full-rank adapter"):
        big = ck.allocate_ranks(model, covs, budget=10**9)
    assert all(big[n] == big.limits[n][1] for n in big) and big.used < big.budget
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = ck.allocate_ranks(model, covs, budget=big.used)  # all at their caps, budget used up: silent
    assert dict(exact) == dict(big)


def test_a_partial_allocation_is_refused_by_a_build_over_more_targets():
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(128, n_batches=2), progress=False)
    ranks = ck.allocate_ranks(model, covs, budget=3000, targets=["*mlp*"])
    with pytest.raises(ValueError, match=r"allocation over 6 module\(s\) within a budget of 3000 .*rank=16"):
        ck.build_corda(model, covs, ranks=ranks)
    assert not ck.corda_layers(model)
    ck.build_corda(model, covs, ranks=ranks, targets=list(ranks))
    assert ck.trainable_parameters(model) == ranks.used <= 3000
    # a plain dict of ranks still overrides rank= for the modules it names only
    model = tiny_llama()
    ck.build_corda(model, covs, rank=2, ranks=dict(ranks))
    assert ck.trainable_parameters(model) > ranks.used


# ---------------------------------------------------------------------- reuse of spectra
def count_spectra(monkeypatch):
    dec = importlib.import_module("corda_kernels.decompose")
    rw = importlib.import_module("corda_kernels.rewrite")
    calls = {"score": 0, "build": 0, "values": 0}
    orig = dec.compute_spectrum
    orig_values = dec.spectrum_values
    orig_selected = rw.selected_spectrum

    def scored(*a, **k):
        calls["score"] += 1
        return orig(*a, **k)

    def valued(*a, **k):
        calls["values"] += 1
        return orig_values(*a, **k)

    def built(*a, **k):
        calls["build"] += 1
        return orig_selected(*a, **k)

    monkeypatch.setattr(dec, "compute_spectrum", scored)
    monkeypatch.setattr(dec, "spectrum_values", valued)
    monkeypatch.setattr(rw, "selected_spectrum", built)
    return calls


def test_each_layer_is_decomposed_once_per_candidate_and_vectors_only_when_kept(monkeypatch):
    model = tiny_llama()
    batches = padded_batches(128, n_batches=4)
    calls = count_spectra(monkeypatch)
    cands = ck.collect_cov(model, batches, candidates=2, progress=False)
    n = len(cands.selected)
    assert calls == {"values": 0, "score": 2 * n, "build": 0}
    covs = ck.select_covariances(model, cands)
    ranks = ck.allocate_ranks(model, covs, budget=0.5, rank=4)
    ck.build_corda(model, covs, ranks=ranks)
    assert calls == {"values": 0, "score": 2 * n, "build": 0}  # nothing decomposed twice
    # keep_spectra=False: singular values only (LAPACK's values-only solver), everywhere.
    calls.update(values=0, score=0)
    lean = ck.collect_cov(tiny_llama(), batches, candidates=2, progress=False, keep_spectra=False)
    assert calls == {"values": 2 * n, "score": 0, "build": 0}
    calls.update(values=0)
    m = tiny_llama()
    ck.allocate_ranks(m, ck.collect_cov(m, batches, progress=False), budget=0.5, rank=4, keep_spectra=False)
    assert calls == {"values": n, "score": 0, "build": 0}
    assert lean.group_scores == cands.group_scores or all(
        abs(a - b) <= 1e-9 * abs(b) for ra, rb in zip(lean.group_scores, cands.group_scores) for a, b in zip(ra, rb)
    )


def test_cache_is_ignored_when_weights_or_damping_change(monkeypatch):
    batches = padded_batches(128, n_batches=2)
    base = tiny_llama()
    covs = ck.collect_cov(base, batches, progress=False)
    calls = count_spectra(monkeypatch)
    ranks = ck.allocate_ranks(base, covs, budget=0.5, rank=4)
    n = len(covs)
    assert calls == {"score": n, "build": 0, "values": 0}  # plain covariances: computed once here, then cached

    model = copy.deepcopy(base)  # other tensors: nothing may hit
    ck.build_corda(model, covs, ranks=ranks)
    assert calls["build"] == n

    model = copy.deepcopy(base)
    ck.allocate_ranks(model, covs, budget=0.5, rank=4)  # re-cache against this model's weights
    calls["build"] = 0
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.004)  # in place, within the signature tolerance
    with torch.no_grad():
        before = model(**batches[0]).logits
    ck.build_corda(model, covs, ranks=ranks)
    assert calls["build"] == 1
    with torch.no_grad():
        assert rel(model(**batches[0]).logits, before) < 1e-5

    model = copy.deepcopy(base)
    ck.allocate_ranks(model, covs, budget=0.5, rank=4)
    calls["build"] = 0
    ck.build_corda(model, covs, ranks=ranks, damping=0.02)
    assert calls["build"] == n


def test_keep_spectra_false_keeps_values_only(monkeypatch):
    model = tiny_llama()
    batches = padded_batches(128, n_batches=2)
    cands = ck.collect_cov(model, batches, candidates=2, progress=False, keep_spectra=False)
    calls = count_spectra(monkeypatch)
    covs = ck.select_covariances(model, cands)
    ranks = ck.allocate_ranks(model, covs, budget=0.5, rank=4)
    assert calls["score"] == 0  # the values were enough for the allocation
    ck.build_corda(model, covs, ranks=ranks)
    assert calls["build"] == len(covs)


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_end_to_end_tiny_llama(mode, tmp_path):
    model = tiny_llama()
    batches = padded_batches(128, n_batches=8, batch=2, seq=16)
    with torch.no_grad():
        before = [model(**b).logits for b in batches[:2]]
    cands = ck.collect_cov(model, batches, candidates=4, progress=False)
    covs = ck.select_covariances(model, cands, mode=mode)
    ranks = ck.allocate_ranks(model, covs, budget=0.5, mode=mode, rank=8)
    shapes = {n: weight_shape(m) for n, m in model.named_modules() if n in covs}
    expected = sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())
    assert expected == ranks.used <= ranks.budget
    ck.build_corda(model, covs, ranks=ranks, mode=mode)
    with torch.no_grad():
        after = [model(**b).logits for b in batches[:2]]
    for a, b in zip(after, before):
        assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())
    assert ck.trainable_parameters(model) == expected
    layers = ck.corda_layers(model)
    assert {n: layer.rank for n, layer in layers.items()} == dict(ranks)

    png = ck.plot_ranks(ranks, tmp_path / "ranks.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the format follows the extension, as plot_report's does
    for name, magic in (("ranks.svg", b"<?xml"), ("ranks.pdf", b"%PDF"), ("ranks", b"\x89PNG")):
        with open(ck.plot_ranks(ranks, tmp_path / name), "rb") as f:
            assert f.read(len(magic)) == magic, name


def test_cache_sees_writes_through_data():
    # weight.data.copy_(...) leaves _version alone (older init code and loaders write that way): the
    # cached spectrum must still be dropped, or build_corda would reuse the old weight's components.
    model = tiny_llama()
    batches = padded_batches(128, n_batches=4)
    covs = ck.select_covariances(model, ck.collect_cov(model, batches, candidates=2, progress=False))
    name = "model.layers.0.mlp.down_proj"
    w = model.get_submodule(name).weight
    cache = covs.spectrum_cache
    assert cache.values(name, w, covs[name], DAMP, torch.float32) is not None
    torch.manual_seed(5)
    w.data.copy_(w + torch.randn_like(w) * w.std() * 3e-3)  # a small change: within the signature tolerance
    assert cache.values(name, w, covs[name], DAMP, torch.float32) is None
    fresh = copy.deepcopy(model)
    ck.build_corda(model, covs, rank=4, mode="ipm")
    ck.build_corda(fresh, covs.to("cpu"), rank=4, mode="ipm")  # .to() drops the cache
    got, ref = ck.corda_layers(model)[name], ck.corda_layers(fresh)[name]
    assert rel(got.lora_B @ got.lora_A, ref.lora_B @ ref.lora_A) < 1e-4


def test_an_all_zero_round_is_no_candidate_and_errors_name_the_round():
    # The 4th batch is all zeros: layer 0 has rows but a zero covariance there. Plain collection
    # accepts this loader; candidate collection must skip that round for that layer, not abort.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [torch.randn(4, 8) for _ in range(3)] + [torch.zeros(4, 8)]
    cands = ck.collect_cov(model, batches, candidates=4, progress=False)
    assert cands.group_scores[0][3] is None and cands.chosen[0] != 3
    assert all(s is not None for s in cands.group_scores[0][:3])
    # A candidate that cannot be decomposed says which round it came from.
    bad = [torch.randn(4, 8), torch.full((4, 8), float("inf"))]
    with pytest.raises(ValueError, match="round 1"):
        ck.collect_cov(nn.Sequential(nn.Linear(8, 8)), bad, candidates=2, progress=False)
    # All-zero inputs in every round: the error says so, rather than that no token came.
    with pytest.raises(ValueError, match=r"\['0'\] counted no token, or read only all-zero inputs, in every round"):
        ck.collect_cov(model, [torch.zeros(4, 8)] * 2, candidates=2, progress=False)


def test_allocation_checks_plain_dict_covariances_by_name_and_takes_numpy_ints():
    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
    good = {"0": torch.eye(8), "1": torch.eye(8)}
    with pytest.raises(ValueError, match=r"cov of module '1' must be \(8, 8\)"):
        ck.allocate_ranks(model, {"0": torch.eye(8), "1": torch.eye(7)}, budget=60)
    with pytest.raises(ValueError, match="no covariance for module '1'"):
        ck.allocate_ranks(model, {"0": torch.eye(8)}, budget=60, targets=["0", "1"])
    ranks = ck.allocate_ranks(model, good, budget=np.int64(60), min_rank=np.int64(2), multiple=np.int32(1))
    assert min(ranks.values()) >= 2 and ranks.used <= 60


def test_plot_keeps_blocks_and_experts_apart():
    from corda_kernels.plot import _block_labels, _split

    # The expert index is not the block: expert 0 of block 1 is not added to expert 0 of block 0.
    assert _split("model.layers.1.mlp.experts.0.w1") == ("model.layers", "1", "w1[0]")
    assert _split("model.layers.0.mlp.experts.0.w1") == ("model.layers", "0", "w1[0]")
    assert _split("decoder.block.0.layer.1.EncDecAttention.q") == ("decoder.block", "0", "q[1]")
    assert _split("lm_head") == ("", "", "lm_head")
    # A vision tower's layer 0 and a language model's layer 0 are two blocks.
    keys = [("model.vision_tower.encoder.layers", "0"), ("model.language_model.layers", "0")]
    assert _block_labels(keys) == ["vision_tower.encoder.layers.0", "language_model.layers.0"]
    assert _block_labels([("model.layers", "0"), ("model.layers", "1")]) == ["0", "1"]


def test_candidates_passed_where_covariances_belong_get_a_hint():
    model = nn.Sequential(nn.Linear(8, 8))
    cands = ck.collect_cov(model, [torch.randn(4, 8)] * 2, candidates=2, progress=False)
    for call in (lambda: ck.build_corda(model, cands, rank=2), lambda: ck.allocate_ranks(model, cands, budget=0.5)):
        with pytest.raises(TypeError, match=r"select_covariances\(model, cands\) first"):
            call()
    assert not ck.corda_layers(model)


def test_an_adapter_rank_wider_than_layers():
    # Wider than one narrow layer (a router): scored over all its components, with a warning; wider
    # than every layer: a typo, refused before collecting.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    batches = [torch.randn(4, 8) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"exceeds min\(d_out, d_in\) of 1 module\(s\) \(e.g. '1': 4\)"):
        cands = ck.collect_cov(model, batches, candidates=2, sum_over="adapter", rank=6, progress=False)
    full = ck.collect_cov(model, batches, candidates=2, progress=False)  # sum_over="all"
    assert cands.group_scores[1] == full.group_scores[1]
    with pytest.raises(ValueError, match=r"rank 9 \(sum_over='adapter'\) exceeds min\(d_out, d_in\) of every"):
        ck.collect_cov(model, batches, candidates=2, sum_over="adapter", rank=9, progress=False)


def test_spectra_vectors_are_freed_by_the_build_that_used_them_or_never_kept():
    model = tiny_llama()
    batches = padded_batches(128, n_batches=2)
    covs = ck.collect_cov(model, batches, progress=False)
    ranks = ck.allocate_ranks(model, covs, budget=0.5, rank=4)
    cache = covs.spectrum_cache
    assert len(cache._spectra) == len(covs)  # kept for the build to reuse
    other = copy.deepcopy(model)  # other weight tensors: the cache serves it nothing, and keeps its vectors
    ck.build_corda(other, covs, ranks=ranks)
    assert len(cache._spectra) == len(covs)
    ck.build_corda(model, covs, ranks=ranks)
    assert not cache._spectra and len(cache._values) == len(covs)  # the build freed what it used

    fresh = tiny_llama()
    cands = ck.collect_cov(fresh, batches * 2, candidates=2, progress=False)
    lean = ck.select_covariances(fresh, cands)
    assert lean.spectrum_cache._spectra  # CorDA++ selection keeps the winners' vectors...
    lean_ranks = ck.allocate_ranks(fresh, lean, budget=0.5, rank=4, keep_spectra=False)
    assert not lean.spectrum_cache._spectra  # ...and keep_spectra=False lets them go too
    reference = copy.deepcopy(fresh)
    ck.build_corda(fresh, lean, ranks=lean_ranks)
    ref_covs = ck.select_covariances(reference, ck.collect_cov(reference, batches * 2, candidates=2, progress=False))
    ck.build_corda(reference, ref_covs, ranks=lean_ranks)
    for name, layer in ck.corda_layers(fresh).items():
        twin = ck.corda_layers(reference)[name]
        assert rel(layer.lora_B @ layer.lora_A, twin.lora_B @ twin.lora_A) < 1e-4, name
