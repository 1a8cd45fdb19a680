import warnings

import pytest
import torch
from tiny import rel

import corda_kernels as ck
from corda_kernels.decompose import MAX_DAMPING_DOUBLINGS, context_svd_reference


def _cov(d, n, dtype=torch.float32):
    """Covariance from n tokens with a decaying spectrum; n < d makes it rank-deficient."""
    x = torch.randn(n, d, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    x = x + 0.3 * torch.randn(n, 1, dtype=torch.float64)  # a shared direction, as real activations have
    return (x.T @ x / n).to(dtype)


def _components(A, B):
    """Per-component outer products B[:, i] ⊗ A[i]: invariant to the sign of each singular pair."""
    return torch.einsum("oi,ik->iok", B.double(), A.double())


SHAPES = [(24, 37), (37, 24), (29, 29), (50, 13)]


@pytest.mark.parametrize("d_out,d_in", SHAPES)
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("tokens", ["full", "deficient"])
def test_matches_float64_reference(d_out, d_in, mode, tokens):
    n = 4 * d_in if tokens == "full" else max(2, d_in // 3)
    w = torch.randn(d_out, d_in) / d_in**0.5
    c = _cov(d_in, n)
    r = 5
    dec = ck.context_svd(w, c, r, mode, scaling=2.0)
    A_ref, B_ref, s_ref = context_svd_reference(w, c, r, mode, scaling=2.0)
    assert dec.A.shape == (r, d_in) and dec.B.shape == (d_out, r)
    assert rel(dec.singular_values, s_ref) < 1e-5
    assert torch.all(dec.singular_values[:-1] >= dec.singular_values[1:])
    # Each selected component, and the adapter product, agree with the textbook route.
    assert rel(2.0 * dec.B.double() @ dec.A.double(), 2.0 * B_ref @ A_ref) < 2e-4
    assert rel(_components(dec.A, dec.B), _components(A_ref, B_ref)) < 2e-4
    # Balanced split: |B[:, i]| = |A[i] C_d V_i| scale; check the column norms of B against the reference.
    assert rel(dec.B.double().norm(dim=0), B_ref.norm(dim=0)) < 2e-4
    # Exact reconstruction by construction.
    recon = dec.residual.double() + 2.0 * dec.B.double() @ dec.A.double()
    assert rel(recon, w) < 1e-6
    assert dec.residual.dtype == w.dtype


def test_kpm_and_ipm_pick_opposite_ends():
    w = torch.randn(16, 16)
    c = _cov(16, 64)
    k = ck.context_svd(w, c, 3, "kpm")
    i = ck.context_svd(w, c, 3, "ipm")
    assert k.indices.tolist() == [13, 14, 15]
    assert i.indices.tolist() == [0, 1, 2]
    # IPM's adapter carries most of W·C's energy, KPM's the least.
    wc = lambda d: (d.B.double() @ d.A.double() @ c.double()).norm()  # noqa: E731
    assert wc(i) > 10 * wc(k)


def test_float64_compute_and_half_weights():
    w = torch.randn(20, 30, dtype=torch.float64)
    c = _cov(30, 90, torch.float64)
    dec = ck.context_svd(w, c, 4, "kpm", compute_dtype=torch.float64)
    A_ref, B_ref, _ = context_svd_reference(w, c, 4, "kpm")
    assert rel(dec.B @ dec.A, B_ref @ A_ref) < 1e-9
    wh = w.half()
    dec = ck.context_svd(wh, c.float(), 4, "ipm")
    assert dec.residual.dtype == torch.float16 and dec.A.dtype == torch.float16
    recon = dec.residual.float() + dec.B.float() @ dec.A.float()
    assert rel(recon, wh.float()) < 2e-3  # fp16 rounding of the residual


def test_rank_deficient_weight_is_finite():
    # W of rank 3: most singular values of W·C are exactly zero.
    w = (torch.randn(12, 3) @ torch.randn(3, 20)).float()
    c = _cov(20, 8)
    dec = ck.context_svd(w, c, 6, "kpm")
    for t in (dec.A, dec.B, dec.residual):
        assert torch.isfinite(t).all()
    assert rel(dec.residual.double() + dec.B.double() @ dec.A.double(), w) < 1e-6
    assert (dec.B.double() @ dec.A.double()).norm() < 1e-5 * w.norm()


def test_bounded_damping_and_bad_covariances():
    w = torch.randn(8, 8)
    # Indefinite: no damping ladder makes -I + small·I positive definite.
    with pytest.raises(ValueError, match=f"doubled {MAX_DAMPING_DOUBLINGS} times"):
        ck.context_svd(w, torch.diag(torch.tensor([10.0, -9, 1, 1, 1, 1, 1, 1])), 2)
    with pytest.raises(ValueError, match="zero"):
        ck.context_svd(w, torch.zeros(8, 8), 2)
    c = _cov(8, 32)
    c[0, 0] = float("nan")
    with pytest.raises(ValueError, match="cov contains NaN"):
        ck.context_svd(w, c, 2)
    # Slightly indefinite from rounding: damping recovers.
    c = _cov(8, 3)
    c -= 0.015 * c.diagonal().mean() * torch.eye(8)
    with pytest.warns(UserWarning, match=r"damping was raised from 0\.01 to 0\.0[2-9]"):
        dec = ck.context_svd(w, c, 2, damping=0.01)
    assert dec.damping > 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when the damping given is enough
        assert ck.context_svd(w, _cov(8, 32), 2).damping == 0.01


def test_argument_errors_name_the_argument():
    w = torch.randn(6, 10)
    c = _cov(10, 30)
    with pytest.raises(ValueError, match=r"rank 7 exceeds min\(d_out, d_in\) = 6"):
        ck.context_svd(w, c, 7)
    with pytest.raises(ValueError, match="rank"):
        ck.context_svd(w, c, 0)
    with pytest.raises(ValueError, match="mode"):
        ck.context_svd(w, c, 2, "pissa")
    with pytest.raises(ValueError, match=r"cov must be \(10, 10\)"):
        ck.context_svd(w, c[:9, :9], 2)
    with pytest.raises(ValueError, match="weight contains NaN"):
        ck.context_svd(w.clone().fill_(float("nan")), c, 2)
    with pytest.raises(TypeError, match="weight has dtype torch.int8"):
        ck.context_svd(w.to(torch.int8), c, 2)
    with pytest.raises(ValueError, match="scaling"):
        ck.context_svd(w, c, 2, scaling=0.0)


@pytest.mark.parametrize("d_out,d_in", [(24, 37), (50, 13)])
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("subset", [True, False])
def test_selected_spectrum_equals_the_full_one(d_out, d_in, mode, subset, monkeypatch):
    from corda_kernels import decompose as dec

    if not subset:
        monkeypatch.setattr(dec, "_subset_eigh", lambda: None)
    elif dec._subset_eigh() is None:
        pytest.skip("scipy is not installed: only the torch path exists")
    w = torch.randn(d_out, d_in)
    damped = dec.damp_covariance(_cov(d_in, 3 * d_in))
    full = dec.compute_spectrum(w, damped)
    part = dec.selected_spectrum(w, damped, 4, mode)
    assert part.singular_values.numel() == 4 and not part.complete
    s_full, _, idx = full.take(4, mode)
    s_part, _, idx_part = part.take(4, mode)
    assert torch.equal(idx, idx_part)
    assert rel(s_part, s_full) < 1e-10
    A1, B1, _ = dec.adapter_factors(w, damped, full, 4, mode)
    A2, B2, _ = dec.adapter_factors(w, damped, part, 4, mode)
    assert rel(_components(A2, B2), _components(A1, B1)) < 1e-5
    with pytest.raises(ValueError, match="partial spectrum"):
        part.take(4, "ipm" if mode == "kpm" else "kpm")


def test_half_precision_factors_that_overflow_are_an_error_naming_the_layer():
    # B grows as √(covariance scale): raw sums over many tokens can push it past fp16's range,
    # which used to give an inf residual and a NaN model without a word.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16)).half()
    before = model[0].weight.clone()
    c = _cov(16, 64)
    ck.build_corda(model, {"0": c}, rank=4, mode="ipm")  # a mean covariance: fine
    ck.merge_corda(model)
    model[0].weight.data.copy_(before)
    with pytest.raises(ValueError, match=r"module '0'.*float16's range.*normalize='mean'"):
        ck.build_corda(model, {"0": c * 1e12}, rank=4, mode="ipm")
    assert isinstance(model[0], torch.nn.Linear) and torch.equal(model[0].weight, before)
    # A tiny alpha unbalances the factors too, and the message says so.
    with pytest.raises(ValueError, match=r"module '0'.*alpha/rank \(here 2\.5e-13\).*keep alpha near the rank"):
        ck.build_corda(model, {"0": c}, rank=4, mode="ipm", alpha=1e-12)
    assert isinstance(model[0], torch.nn.Linear) and torch.equal(model[0].weight, before)
    # The same scale is harmless in fp32: only the balance of A against B moved.
    dec = ck.context_svd(before.float(), c * 1e12, 4, "ipm")
    assert torch.isfinite(dec.B).all() and float(dec.B.abs().max()) > 7e4


def test_decomposition_and_merge_ignore_a_tf32_setting(monkeypatch):
    # With TF32 on (a common training setting), fp32 matmuls on CUDA keep 10 mantissa bits; the
    # residual and the merge must still be fp32-exact. Checked here through the flag each fp32
    # matmul of build and merge sees; the user's setting comes back afterwards.
    flags = torch.backends.cuda.matmul
    # A property of torch's backend object: monkeypatch cannot restore it. fp32_precision is the
    # torch >= 2.9 name; older releases have only allow_tf32.
    name = "fp32_precision" if hasattr(flags, "fp32_precision") else "allow_tf32"
    old = getattr(flags, name)
    setattr(flags, name, "tf32" if name == "fp32_precision" else True)
    try:
        _check_tf32_is_off_inside(monkeypatch)
    finally:
        setattr(flags, name, old)


def _check_tf32_is_off_inside(monkeypatch):
    from corda_kernels.ops._backend import full_fp32_matmul, tf32_matmul

    assert tf32_matmul()
    with full_fp32_matmul():
        assert not tf32_matmul()
    assert tf32_matmul()
    seen = []
    real_addmm, real_matmul = torch.addmm, torch.Tensor.__matmul__

    def addmm(*args, **kwargs):
        seen.append(("addmm", tf32_matmul()))
        return real_addmm(*args, **kwargs)

    def matmul(a, b):
        if a.dtype == torch.float32:
            seen.append(("matmul", tf32_matmul()))
        return real_matmul(a, b)

    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    ck.build_corda(model, {"0": _cov(12, 40)}, rank=3)
    ck.merge_corda(model)
    assert {kind for kind, _ in seen} == {"addmm", "matmul"}
    assert not any(tf32 for _, tf32 in seen), seen
    assert tf32_matmul()


def test_tall_ipm_layer_on_an_ill_conditioned_covariance():
    # d_out > d_in and C from 20 tokens at damping 0 (raised to 1e-6): cond(C_d) ~ 1e6. IPM's leading
    # components must not go through a solve with C_d, which would amplify V's rounding by that much
    # (it was 19% off). KPM's tail there is limited by the Gram's resolution, whatever the route.
    torch.manual_seed(0)
    w = torch.randn(96, 64) / 8
    x = torch.randn(20, 64)
    c = x.T @ x / 20
    with pytest.warns(UserWarning, match="raised from 0 to 1e-06"):
        dec = ck.context_svd(w, c, 4, "ipm", damping=0.0)
    assert dec.damping == 1e-6
    A_ref, B_ref, _ = context_svd_reference(w, c, 4, "ipm", damping=dec.damping)
    assert rel(dec.B.double() @ dec.A.double(), B_ref @ A_ref) < 1e-6


def test_tall_ipm_rank_above_the_numerical_rank():
    # A 200x50 weight of rank 40, IPM r=45: five components at W·C_d's rounding floor. They must go
    # through the solve (the identity would divide rounding by a noise-level σ: A blew up to ~4e3).
    torch.manual_seed(0)
    w = torch.randn(200, 50, dtype=torch.float64)
    w[:, 40:] = 0
    x = torch.randn(400, 50, dtype=torch.float64)
    c = x.T @ x / 400
    A_ref, B_ref, _ = context_svd_reference(w, c, 45, "ipm")
    dec = ck.context_svd(w.float(), c.float(), 45, "ipm")
    err = (dec.B.double() @ dec.A.double() - B_ref @ A_ref).norm() / w.norm()
    assert err < 1e-6 and float(dec.A.abs().max()) < 10


def test_rank_takes_any_integer_type_and_nothing_else():
    import numpy as np
    from tiny import padded_batches, tiny_llama

    torch.manual_seed(0)
    w, c = torch.randn(12, 9), _cov(9, 40)
    want = ck.context_svd(w, c, 3)
    for r in (np.int64(3), torch.tensor(3)):
        got = ck.context_svd(w, c, r)
        assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)
    for bad in (0, -1, 2.0, 1.5, True, "3", torch.tensor(3.0)):
        with pytest.raises(ValueError, match=r"rank must be a positive int, got"):
            ck.context_svd(w, c, bad)
    model = tiny_llama()
    covs = ck.collect_cov(model, padded_batches(model.config.vocab_size, n_batches=1), progress=False)
    first = next(iter(covs))
    with pytest.raises(ValueError, match=rf"rank of module '{first}' must be a positive int, got 2.0"):
        ck.build_corda(model, covs, rank=2, ranks={first: 2.0})
    assert not ck.corda_layers(model)
    ck.build_corda(model, covs, rank=np.int64(2), ranks={first: np.int32(3)})
    layers = ck.corda_layers(model)
    assert layers[first].rank == 3 and type(layers[first].rank) is int
    assert {type(m.rank) for m in layers.values()} == {int} and layers[next(reversed(layers))].rank == 2
    # allocate_ranks reads its integers the same way
    fresh = tiny_llama()
    a = ck.allocate_ranks(fresh, covs, budget=0.5, rank=torch.tensor(4), min_rank=np.int64(2), multiple=np.int8(2))
    assert a == ck.allocate_ranks(fresh, covs, budget=0.5, rank=4, min_rank=2, multiple=2)
    with pytest.raises(ValueError, match=r"min_rank must be a positive int, got 2.0"):
        ck.allocate_ranks(fresh, covs, budget=0.5, min_rank=2.0)
