"""ops.covariance_update: both backends against a float64 reference.

Without a GPU the Triton path runs under TRITON_INTERPRET=1 (set in conftest),
so every kernel test here also runs on the CPU; bf16 is left to CUDA because
the interpreter mishandles it.
"""

import pytest
import torch
from conftest import CUDA, requires_cuda

from corda_kernels import ops
from corda_kernels.ops import covariance as cov_mod
from corda_kernels.ops.covariance import covariance_reference

DEV = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(acc: torch.Tensor, ref: torch.Tensor) -> float:
    got = ops.covariance_result(acc).double().cpu()
    ref = ref.cpu()
    assert torch.isfinite(got).all(), "non-finite entries in the result"
    return ((got - ref).norm() / ref.norm()).item()


def test_result_in_place_mirrors_the_accumulator_itself():
    x = rand(50, 37)
    acc = torch.zeros(37, 37, device=DEV)
    ops.covariance_update(acc, x, backend="torch")
    acc[5, 2] = 123.0  # below the diagonal: never read
    want = ops.covariance_result(acc)
    got = ops.covariance_result(acc, inplace=True)
    assert got is acc and torch.equal(got, want) and torch.equal(got, got.T)
    assert rel_err(torch.triu(got), covariance_reference(x)) < TOL[torch.float32]


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [37, 129])
def test_plain_rows(backend, dtype, d):
    x = rand(50, d, dtype=dtype) + 0.5  # a non-zero mean makes the off-diagonal tiles matter
    acc = torch.zeros(d, d, device=DEV)
    out = ops.covariance_update(acc, x, backend=backend)
    assert out is acc
    assert rel_err(acc, covariance_reference(x)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout",
    ["column_slice", "transposed", "seq_major", "one_row_per_seq", "four_dims", "one_dim"],
)
def test_strided_inputs(backend, layout):
    d = 37
    if layout == "column_slice":
        x = rand(50, d + 11)[:, 3 : 3 + d]
    elif layout == "transposed":
        x = rand(d, 50).t()
    elif layout == "seq_major":  # (B, T, d) view of a (T, B, d) buffer: rows are not evenly spaced
        x = rand(10, 5, d).transpose(0, 1)
    elif layout == "one_row_per_seq":
        x = rand(50, 2, d)[:, :1]
    elif layout == "four_dims":
        x = rand(2, 5, 9, d + 3)[..., :d]
    else:
        x = rand(d)
    assert not x.is_contiguous() or layout == "one_dim"
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x, backend=backend)
    assert rel_err(acc, covariance_reference(x)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask_kind", ["bool", "int01", "float01"])
def test_masked_rows_do_not_leak(backend, dtype, mask_kind):
    d = 129
    x = rand(5, 10, d, dtype=dtype)
    keep = torch.rand(5, 10, device=DEV) > 0.4
    keep[0, 0] = True
    x[~keep] = float("nan")  # dropped rows must be removed, not multiplied by zero
    mask = {"bool": keep, "int01": keep.to(torch.int64), "float01": keep.float()}[mask_kind]
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x, mask, backend=backend)
    assert rel_err(acc, covariance_reference(x, keep)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per", ["row", "sequence"])
def test_scaled_rows(backend, dtype, per):
    d = 37
    x = rand(4, 13, d, dtype=dtype)
    scale = torch.rand(4, 13, device=DEV) + 0.5 if per == "row" else torch.rand(4, device=DEV) * 3 + 0.1
    mask = torch.rand(4, 13, device=DEV) > 0.3
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x, mask, scale=scale, backend=backend)
    ref = covariance_reference(x, mask, scale)
    assert rel_err(acc, ref) < TOL[dtype]
    # The weight is scale², not scale: an unscaled sum must be far off.
    assert ((covariance_reference(x, mask) - ref).norm() / ref.norm()).item() > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_per_row_scale_equals_the_shaped_one(backend):
    # A flat mask over all rows is taken; so is a flat scale, in x's row order.
    d = 37
    x = rand(4, 13, d)
    scale = torch.rand(4, 13, device=DEV) + 0.5
    mask = torch.rand(4, 13, device=DEV) > 0.3
    flat, shaped = (torch.zeros(d, d, device=DEV) for _ in range(2))
    ops.covariance_update(flat, x, mask.reshape(-1), scale=scale.reshape(-1), backend=backend)
    ops.covariance_update(shaped, x, mask, scale=scale, backend=backend)
    assert rel_err(flat, covariance_reference(x, mask, scale)) < TOL[torch.float32]
    assert torch.equal(flat, shaped)
    # one row (1-D x) with a one-entry scale
    one = torch.zeros(d, d, device=DEV)
    ops.covariance_update(one, x[0, 0], scale=torch.tensor([2.0], device=DEV), backend=backend)
    assert rel_err(one, 4.0 * covariance_reference(x[0, 0])) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_accumulator_whose_entries_share_memory_is_refused(backend):
    x = rand(5, 3)
    acc = torch.zeros(1, 3, device=DEV).expand(3, 3)  # every row the same three cells
    with pytest.raises(ValueError, match=r"acc's entries share memory \(strides \(0, 1\)"):
        ops.covariance_update(acc, x, backend=backend)
    assert torch.count_nonzero(acc) == 0
    # a transposed or sliced view has its own cell per entry and is fine
    big = torch.zeros(5, 5, device=DEV)
    ops.covariance_update(big[1:4, 2:5].t(), x, backend=backend)
    assert rel_err(ops.covariance_result(big[1:4, 2:5].t().clone()), covariance_reference(x)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_successive_updates(backend, acc_dtype):
    d = 129
    acc = torch.zeros(d, d, device=DEV, dtype=acc_dtype)
    ref = torch.zeros(d, d, dtype=torch.float64)
    for step in range(3):
        x = rand(2, 25, d, dtype=torch.float16 if step == 1 else torch.float32) + step
        mask = torch.rand(2, 25, device=DEV) > 0.2
        scale = torch.rand(2, device=DEV) + 0.5
        ops.covariance_update(acc, x, mask, scale=scale, backend=backend)
        ref += covariance_reference(x, mask, scale).cpu()
    assert acc.dtype == acc_dtype
    assert rel_err(acc, ref) < TOL[torch.float16]


def test_backends_share_one_accumulator():
    d = 129
    x1, x2 = rand(50, d), rand(30, d)
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x1, backend="torch")
    ops.covariance_update(acc, x2, backend="triton")
    ref = covariance_reference(x1) + covariance_reference(x2)
    assert rel_err(acc, ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lower_triangle_is_never_read(backend):
    d = 129
    x = rand(50, d)
    acc = torch.zeros(d, d, device=DEV)
    lower = torch.ones(d, d, device=DEV, dtype=torch.bool).tril(-1)
    acc[lower] = float("nan")
    ops.covariance_update(acc, x, backend=backend)
    assert rel_err(acc, covariance_reference(x)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_runs_longer_than_a_row_chunk(backend, dtype):
    # Long runs of padding (the kernel never visits dropped rows: it walks the kept-row list) next to
    # partly padded stretches; every padded row holds NaN, which must not reach the sum.
    d = 37
    x = rand(4, 70, d, dtype=dtype) + 0.5
    mask = torch.ones(4, 70, dtype=torch.bool, device=DEV)
    mask[0, 10:] = False  # 60 padded rows in a row, ragged start
    mask[1] = False  # a sequence with no kept token
    mask[3, :45] = False  # left padding
    x[~mask] = float("nan")
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x, mask, backend=backend)
    ref = covariance_reference(torch.where(mask.unsqueeze(-1), x, 0.0), mask)
    assert rel_err(acc, ref) < TOL[dtype]
    # and the same update with every row kept but the padding zeroed agrees with it
    acc_all = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc_all, torch.where(mask.unsqueeze(-1), x, 0.0), backend=backend)
    assert rel_err(acc, ops.covariance_result(acc_all).double()) < TOL[dtype]


@pytest.mark.parametrize("split", [{"band": 16}, {"band": 50}, {"leaf": 8}, {"leaf": 20}, {"leaf": 64}])
def test_torch_triangle_splits(split):
    # Both torch triangle layouts (recursive halves, row bands) on a small d, with ragged last blocks.
    d = 129
    x = rand(3, 20, d)
    mask = torch.rand(3, 20, device=DEV) > 0.3
    acc = torch.zeros(d, d, device=DEV)
    acc[torch.ones(d, d, dtype=torch.bool, device=DEV).tril(-1)] = float("nan")
    scale = torch.rand(3, device=DEV) + 0.5
    cov_mod.covariance_update_torch(acc, x, mask, scale, **split)
    assert rel_err(acc, covariance_reference(x, mask, scale)) < TOL[torch.float32]
    assert torch.isnan(acc[d - 1, 0])  # the lower triangle was skipped


def test_torch_default_triangle_skips_lower_triangle():
    d = 2 * cov_mod.TORCH_LEAF + 7
    x = rand(30, d)
    acc = torch.zeros(d, d, device=DEV)
    acc[d - 1, 0] = float("nan")
    cov_mod.covariance_update_torch(acc, x)
    assert torch.isnan(acc[d - 1, 0])
    assert rel_err(acc, covariance_reference(x)) < TOL[torch.float32]


def test_triton_grid_skips_lower_tiles():
    # Entry (d-1, 0) lies in a strictly lower tile for any tile width below d: no program may touch it.
    d = 129
    acc = torch.full((d, d), 7.0, device=DEV)
    ops.covariance_update(acc, rand(50, d), backend="triton")
    assert acc[d - 1, 0].item() == 7.0
    assert acc[0, d - 1].item() != 7.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_is_a_no_op(backend):
    acc = torch.eye(37, device=DEV)
    ops.covariance_update(acc, rand(0, 37), backend=backend)
    assert torch.equal(acc, torch.eye(37, device=DEV))


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [37, 129, 1000])
def test_bf16_cuda(backend, d):
    x = rand(3, 50, d, dtype=torch.bfloat16)
    mask = torch.rand(3, 50, device=DEV) > 0.3
    scale = torch.rand(3, device=DEV) + 0.5
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x, mask, scale=scale, backend=backend)
    assert rel_err(acc, covariance_reference(x, mask, scale)) < TOL[torch.bfloat16]
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x, backend=backend)
    assert rel_err(acc, covariance_reference(x)) < TOL[torch.bfloat16]


@requires_cuda
def test_auto_picks_triton_on_cuda(monkeypatch):
    called = []
    real = cov_mod.covariance_update_triton
    monkeypatch.setattr(cov_mod, "covariance_update_triton", lambda *a: called.append(1) or real(*a))
    acc = torch.zeros(37, 37, device=DEV)
    ops.covariance_update(acc, rand(50, 37))
    assert called


def _forbid_triton(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton launcher must not be called here")

    monkeypatch.setattr(cov_mod, "covariance_update_triton", boom)


def test_auto_picks_torch_on_cpu(monkeypatch):
    _forbid_triton(monkeypatch)
    x = torch.randn(50, 37)
    acc = torch.zeros(37, 37)
    ops.covariance_update(acc, x, backend="auto")
    assert rel_err(acc, covariance_reference(x)) < TOL[torch.float32]


def test_env_forces_torch(monkeypatch):
    _forbid_triton(monkeypatch)
    monkeypatch.setenv("CORDA_KERNELS_BACKEND", "torch")
    x = rand(50, 37)
    acc = torch.zeros(37, 37, device=DEV)
    ops.covariance_update(acc, x, backend="triton")
    assert rel_err(acc, covariance_reference(x)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments(backend):
    x = torch.randn(50, 37, device=DEV)
    acc = torch.zeros(37, 37, device=DEV)
    with pytest.raises(TypeError, match="acc must be float32 or float64"):
        ops.covariance_update(acc.half(), x, backend=backend)
    if backend == "triton":  # float64 x is the torch path's alone
        with pytest.raises(TypeError, match="use backend='torch'"):
            ops.covariance_update(acc, x.double(), backend=backend)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.covariance_update(acc, x.to(torch.int32), backend=backend)
    with pytest.raises(ValueError, match="square"):
        ops.covariance_update(torch.zeros(37, 36, device=DEV), x, backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 37\)"):
        ops.covariance_update(acc, torch.randn(50, 36, device=DEV), backend=backend)
    with pytest.raises(ValueError, match="mask has shape"):
        ops.covariance_update(acc, x, torch.ones(49, dtype=torch.bool, device=DEV), backend=backend)
    with pytest.raises(ValueError, match=r"scale of shape \(3,\) fits neither x's leading dims \(50,\)"):
        ops.covariance_update(acc, x, scale=torch.ones(3, device=DEV), backend=backend)
    x3 = x.reshape(5, 10, 37)
    with pytest.raises(ValueError, match=r"scale of shape \(10,\) .*\(5, 10\).* nor a flat list of its 50 rows"):
        ops.covariance_update(acc, x3, scale=torch.ones(10, device=DEV), backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.covariance_update(acc, x, backend="cuda")
    assert torch.count_nonzero(acc) == 0


def test_float64_input_takes_the_torch_path():
    # A float64 model collects on the torch path under backend="auto" (the Triton kernel is 16/32-bit).
    x = torch.randn(3, 20, 37, dtype=torch.float64, device=DEV)
    mask = torch.rand(3, 20, device=DEV) > 0.3
    acc = torch.zeros(37, 37, dtype=torch.float64, device=DEV)
    ops.covariance_update(acc, x, mask)
    ref = covariance_reference(x, mask)
    got = ops.covariance_result(acc).cpu()
    assert ((got - ref.cpu()).norm() / ref.norm()).item() < 1e-12


@pytest.mark.parametrize("kind", ["random", "none kept", "all kept", "no rows"])
def test_kept_rows_lists_the_kept_rows_in_order(kind):
    rows = 0 if kind == "no rows" else 77
    mask = torch.rand(rows, device=DEV) > 0.4
    if kind == "none kept":
        mask[:] = False
    if kind == "all kept":
        mask[:] = True
    index, count = ops.KeptRows(mask).index_and_count()
    n = int(count.item())
    assert index.dtype == count.dtype == torch.int32 and index.numel() == rows + 1
    assert n == int(mask.sum())
    assert torch.equal(index[:n].long().cpu(), mask.nonzero().squeeze(1).cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_rows_serve_several_updates_and_layouts(backend):
    # One KeptRows for a (B, T) mask, fed to updates whose x are (B, T, d) and its flattened (B·T, d)
    # view, with a per-sequence scale: the same as passing the mask each time.
    B, T, d = 3, 40, 37
    mask = torch.rand(B, T, device=DEV) > 0.3
    mask[1] = False
    kept = ops.KeptRows(mask)
    x1, x2 = rand(B, T, d), rand(B, T, d)
    scale = torch.rand(B, device=DEV) + 0.5
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x1, kept, backend=backend)
    ops.covariance_update(acc, x2.reshape(B * T, d), kept, scale=scale.repeat_interleave(T), backend=backend)
    ref = covariance_reference(x1, mask) + covariance_reference(x2, mask, scale)
    assert rel_err(acc, ref) < TOL[torch.float32]
    if backend == "triton":
        first = kept.index_and_count()
        assert kept.index_and_count() is first  # built once, reused


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_rows_of_another_size_is_an_error(backend):
    kept = ops.KeptRows(torch.ones(5, 6, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match=r"KeptRows' mask has shape \(5, 6\) but x's leading dims are \(4, 6\)"):
        ops.covariance_update(torch.zeros(7, 7, device=DEV), rand(4, 6, 7), kept, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_row_dropped_leaves_acc_unchanged(backend, dtype):
    d = 41
    acc = torch.randn(d, d, device=DEV)
    before = acc.clone()
    x = rand(2, 30, d, dtype=dtype)
    x[0, 3] = float("nan")  # a dropped row's contents never matter
    ops.covariance_update(acc, x, torch.zeros(2, 30, dtype=torch.bool, device=DEV), backend=backend)
    assert torch.equal(acc, before)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_x_that_requires_grad_builds_no_graph(backend):
    acc = torch.zeros(9, 9, device=DEV)
    for _ in range(2):
        x = torch.randn(13, 9, device=DEV, requires_grad=True)
        ops.covariance_update(acc, x, backend=backend)
    assert not acc.requires_grad and acc.grad_fn is None


def test_a_mask_of_another_shape_is_refused():
    x = torch.randn(2, 3, 5, device=DEV)
    acc = torch.zeros(5, 5, device=DEV)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\) but x's leading dims are \(2, 3\)"):
        ops.covariance_update(acc, x, torch.ones(3, 2, dtype=torch.bool, device=DEV), backend="torch")
    with pytest.raises(ValueError, match=r"KeptRows' mask has shape \(3, 2\)"):
        ops.covariance_update(acc, x, ops.KeptRows(torch.ones(3, 2, device=DEV)), backend="torch")
    flat = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool, device=DEV)  # flat, in row order: fine
    ops.covariance_update(acc, x, flat, backend="torch")
    kept = x.reshape(6, 5)[flat].double()
    assert torch.allclose(ops.covariance_result(acc).double(), kept.T @ kept, atol=1e-5)
    # A (batch, seq) mask for the same rows already flattened: also in row order.
    acc.zero_()
    ops.covariance_update(acc, x.reshape(6, 5), flat.reshape(2, 3), backend="torch")
    assert torch.allclose(ops.covariance_result(acc).double(), kept.T @ kept, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_features(backend):
    acc = torch.zeros(0, 0, device=DEV)
    ops.covariance_update(acc, torch.randn(3, 0, device=DEV), backend=backend)
    assert ops.covariance_result(acc).shape == (0, 0)


def test_fp16_with_a_large_scale_stays_finite_under_auto(monkeypatch):
    # s·x beyond fp16's range: the kernel would round it to inf; "auto" (even with the env asking for
    # the kernels) keeps fp16 with a scale on the fp32 torch path.
    monkeypatch.setenv("CORDA_KERNELS_BACKEND", "triton")
    x = torch.full((4, 6), 200.0, device=DEV).half()
    s = torch.full((4,), 400.0, device=DEV)
    acc = torch.zeros(6, 6, device=DEV)
    ops.covariance_update(acc, x, scale=s)
    ref = (x.double() * s.double()[:, None]).T @ (x.double() * s.double()[:, None])
    assert rel_err(acc, ref) < 1e-6


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_compiled_update_equals_eager(masked, scaled):
    # Dynamo failed on the Triton launch itself (it traced into the autotuner, or under the
    # interpreter into numpy); as a custom op that mutates acc it traces whole, in fullgraph.
    x = rand(3, 37, 20).transpose(0, 1)  # (37, 3, 20), non-contiguous
    mask = torch.rand(37, 3, device=DEV) > 0.3 if masked else None
    scale = torch.rand(37, 1, device=DEV) + 0.5 if scaled else None

    def update(acc, x):
        return ops.covariance_update(acc, x, mask, scale=scale, backend="triton")

    torch._dynamo.reset()
    eager, compiled = torch.zeros(20, 20, device=DEV), torch.zeros(20, 20, device=DEV)
    update(eager, x)
    fn = torch.compile(update, backend="aot_eager", fullgraph=True)
    fn(compiled, x)
    fn(compiled, x)  # a second call reuses the graph and adds again
    assert rel_err(eager, covariance_reference(x, mask, scale)) < TOL[torch.float32]
    assert rel_err(compiled, 2 * covariance_reference(x, mask, scale)) < TOL[torch.float32]


def test_custom_op_passes_opcheck():
    acc, x = torch.zeros(21, 21, device=DEV), rand(2, 9, 21)
    idx, count = cov_mod.KeptRows(torch.rand(2, 9, device=DEV) > 0.4).index_and_count()
    scale = torch.rand(18, device=DEV)
    torch.library.opcheck(cov_mod._cov_triangle_op, (acc, x, None, None, None))
    torch.library.opcheck(cov_mod._cov_triangle_op, (acc, x, idx, count, scale))
