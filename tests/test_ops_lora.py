"""ops.lora_linear: forward and every gradient, both backends, against a float64 reference.

Without a GPU the Triton path runs under TRITON_INTERPRET=1 (set in conftest);
bf16 is left to CUDA because the interpreter mishandles it.
"""

import pytest
import torch
from conftest import CUDA, requires_cuda

from corda_kernels import ops
from corda_kernels.ops import lora as lora_mod
from corda_kernels.ops.lora import lora_linear_reference

DEV = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm()).item()


def make(M, N, K, r, dtype, bias=True):
    """Random operands scaled so y and every gradient are O(1)."""
    g = {"device": DEV}
    x = torch.randn(M, K, **g).to(dtype)
    W = (torch.randn(N, K, **g) / K**0.5).to(dtype)
    b = torch.randn(N, **g).to(dtype) if bias else None
    A = (torch.randn(r, K, **g) / K**0.5).to(dtype)
    B = (torch.randn(N, r, **g) / r**0.5).to(dtype)
    return x, W, b, A, B


def run(x, W, b, A, B, scaling, backend, dropout_p=0.0, train_w=False):
    """Forward and backward through ops.lora_linear and through the float64 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    w = W.detach().clone().requires_grad_(train_w)
    bb = b.detach().clone().requires_grad_(train_w) if (b is not None) else None
    y = ops.lora_linear(leaves[0], w, bb, leaves[1], leaves[2], scaling, dropout_p=dropout_p, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)

    refs = [t.detach().double().requires_grad_() for t in (x, A, B)]
    wr = W.detach().double().requires_grad_(train_w)
    br = b.detach().double().requires_grad_(train_w) if (b is not None) else None
    return y, dy, leaves, w, bb, refs, wr, br


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(50, 37, 29), (33, 70, 75)])
def test_forward_and_grads(backend, dtype, rank, bias, shape):
    M, N, K = shape
    x, W, b, A, B = make(M, N, K, rank, dtype, bias)
    y, dy, (x1, A1, B1), _, _, (xr, Ar, Br), wr, br = run(x, W, b, A, B, 0.7, backend)
    yr = lora_linear_reference(xr, wr, br, Ar, Br, 0.7)
    yr.backward(dy.double())
    assert y.shape == (M, N) and y.dtype == dtype
    tol = TOL[dtype]
    assert rel(y, yr) < tol
    assert rel(x1.grad, xr.grad) < tol
    assert rel(A1.grad, Ar.grad) < tol
    assert rel(B1.grad, Br.grad) < tol
    assert A1.grad.dtype == dtype and B1.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_rank_and_leading_dims(backend):
    # rank 80 spans two rank chunks of the kernel's epilogue; x is (5, 10, K) with a strided last dim.
    _, _, b, A, B = make(50, 37, 29, 80, torch.float32)
    x = torch.randn(5, 10, 40, device=DEV)[..., 3:32]
    W = torch.randn(29, 37, device=DEV).t() / 29**0.5  # weight (N, K) with transposed strides
    y, dy, (x1, A1, B1), _, _, (xr, Ar, Br), wr, br = run(x, W, b, A, B, 2.0, backend)
    yr = lora_linear_reference(xr, wr, br, Ar, Br, 2.0)
    yr.backward(dy.double())
    assert y.shape == (5, 10, 37)
    assert x1.grad.shape == x.shape
    for got, ref in ((y, yr), (x1.grad, xr.grad), (A1.grad, Ar.grad), (B1.grad, Br.grad)):
        assert rel(got, ref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_trainable_weight_and_bias(backend, dtype):
    x, W, b, A, B = make(50, 37, 29, 3, dtype)
    y, dy, (x1, A1, B1), w, bb, (xr, Ar, Br), wr, br = run(x, W, b, A, B, 0.5, backend, train_w=True)
    lora_linear_reference(xr, wr, br, Ar, Br, 0.5).backward(dy.double())
    assert rel(w.grad, wr.grad) < TOL[dtype]
    assert rel(bb.grad, br.grad) < TOL[dtype]
    assert rel(x1.grad, xr.grad) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_with_the_same_mask(backend, dtype, p):
    x, W, b, A, B = make(50, 37, 29, 3, dtype)
    # The op draws its keep mask first, with torch.rand_like over the (M, K) input: replay it.
    torch.manual_seed(99)
    keep = torch.rand_like(x, dtype=torch.float32) >= p
    torch.manual_seed(99)
    y, dy, (x1, A1, B1), _, _, (xr, Ar, Br), wr, br = run(x, W, b, A, B, 1.5, backend, dropout_p=p)
    yr = lora_linear_reference(xr, wr, br, Ar, Br, 1.5, keep=keep, dropout_p=p)
    yr.backward(dy.double())
    for got, ref in ((y, yr), (x1.grad, xr.grad), (A1.grad, Ar.grad), (B1.grad, Br.grad)):
        assert rel(got, ref) < TOL[dtype]
    # And the mask matters: without it the adapter input gradient differs.
    xn = x.detach().double().requires_grad_()
    lora_linear_reference(xn, wr.detach(), None, Ar.detach(), Br.detach(), 1.5).backward(dy.double())
    assert rel(x1.grad, xn.grad) > 10 * TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_adapter_only_input_grad(backend):
    x, W, b, A, B = make(50, 37, 29, 3, torch.float32)
    xg = x.clone().requires_grad_()
    y = ops.lora_linear(xg, W, b, A, B, 0.7, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.double().requires_grad_()
    lora_linear_reference(xr, W, b, A, B, 0.7).backward(dy.double())
    assert rel(xg.grad, xr.grad) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(50, 37, 5), (70, 33, 16), (9, 100, 1), (45, 20, 80)])
@pytest.mark.parametrize("chunks", [1, 3, None])
def test_dy_kernel_one_read_gives_both_products(dtype, shape, chunks):
    # u = dy·B and dB = dyᵀ·s from the fused kernel, with rows split over several programs (atomics)
    # and dy a strided view.
    M, N, r = shape
    dy = torch.randn(M, 2 * N, device=DEV).to(dtype)[:, ::2]
    B = (torch.randn(N, r, device=DEV) / r**0.5).to(dtype)
    s = torch.randn(M, r, device=DEV)
    u, db = lora_mod._dy_lowrank(dy, B, s, chunks=chunks)
    assert u.dtype == db.dtype == torch.float32
    assert rel(u, dy.double() @ B.double()) < TOL[dtype]
    assert rel(db, dy.double().t() @ s.double()) < TOL[dtype]


@pytest.mark.parametrize("which", ["u", "db"])
def test_dy_kernel_computes_only_what_is_asked(which):
    M, N, r = 40, 30, 3
    dy, B, s = torch.randn(M, N, device=DEV), torch.randn(N, r, device=DEV), torch.randn(M, r, device=DEV)
    u, db = lora_mod._dy_lowrank(dy, B if which == "u" else None, s if which == "db" else None, chunks=2)
    if which == "u":
        assert db is None and rel(u, dy.double() @ B.double()) < 1e-5
    else:
        assert u is None and rel(db, dy.double().t() @ s.double()) < 1e-5


@pytest.mark.parametrize("which", ["u", "db", "both"])
def test_dy_kernel_never_hands_a_caller_tensor_to_reset_to_zero(monkeypatch, which):
    # On a GPU the autotuner zeroes u_ptr and db_ptr before each trial: those two arguments
    # must be fresh outputs or scratch, never dy, B or s (the interpreter never autotunes).
    seen = {}

    class Launcher:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.update(zip(["dy", "b", "s", "u", "db"], args[:5]))

            return launch

    monkeypatch.setattr(lora_mod, "_dy_lowrank_tuned", Launcher())
    dy, B, s = torch.randn(40, 30, device=DEV), torch.randn(30, 3, device=DEV), torch.randn(40, 3, device=DEV)
    lora_mod._dy_lowrank(dy, B if which != "db" else None, s if which != "u" else None)
    callers = [t.untyped_storage().data_ptr() for t in (dy, B, s)]
    for out in ("u", "db"):
        assert seen[out].untyped_storage().data_ptr() not in callers
        assert seen[out].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("limit", [0, 4, 64])
def test_backward_takes_the_dy_kernel_up_to_the_fused_limit(monkeypatch, dtype, limit):
    # Up to MAX_FUSED_RANK backward reads dy once in the dy kernel, above it two torch GEMMs
    # (the default, 0, since those were faster on an H200): the same gradients either way.
    monkeypatch.setattr(lora_mod, "MAX_FUSED_RANK", limit)
    calls = []
    real = lora_mod._dy_lowrank
    monkeypatch.setattr(lora_mod, "_dy_lowrank", lambda *a, **k: calls.append(a) or real(*a, **k))
    x, W, b, A, B = make(50, 37, 29, 5, dtype)
    y, dy, (x1, A1, B1), _, _, (xr, Ar, Br), wr, br = run(x, W, b, A, B, 0.7, "triton")
    lora_linear_reference(xr, wr, br, Ar, Br, 0.7).backward(dy.double())
    for got, ref in ((x1.grad, xr.grad), (A1.grad, Ar.grad), (B1.grad, Br.grad)):
        assert rel(got, ref) < TOL[dtype]
    assert len(calls) == (1 if 5 <= limit else 0)


@requires_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [1, 16, 80])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_bf16_cuda(backend, rank, p):
    x, W, b, A, B = make(300, 257, 129, rank, torch.bfloat16)
    torch.manual_seed(5)
    keep = torch.rand_like(x, dtype=torch.float32) >= p if p > 0 else None
    torch.manual_seed(5)
    y, dy, (x1, A1, B1), _, _, (xr, Ar, Br), wr, br = run(x, W, b, A, B, 1.0, backend, dropout_p=p)
    yr = lora_linear_reference(xr, wr, br, Ar, Br, 1.0, keep=keep, dropout_p=p)
    yr.backward(dy.double())
    for got, ref in ((y, yr), (x1.grad, xr.grad), (A1.grad, Ar.grad), (B1.grad, Br.grad)):
        assert rel(got, ref) < TOL[torch.bfloat16]


@requires_cuda
def test_auto_picks_triton_on_cuda(monkeypatch):
    called = []
    real = lora_mod.lora_forward_triton
    monkeypatch.setattr(lora_mod, "lora_forward_triton", lambda *a: called.append(1) or real(*a))
    ops.lora_linear(*make(50, 37, 29, 3, torch.float16), 1.0)
    assert called


def _forbid_triton(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton launchers must not be called here")

    monkeypatch.setattr(lora_mod, "lora_forward_triton", boom)
    monkeypatch.setattr(lora_mod, "lora_backward_triton", boom)


def test_auto_picks_torch_on_cpu(monkeypatch):
    _forbid_triton(monkeypatch)
    x, W, b, A, B = (t.cpu() if t is not None else None for t in make(50, 37, 29, 3, torch.float32))
    A.requires_grad_()
    y = ops.lora_linear(x, W, b, A, B, 1.0, backend="auto")
    y.sum().backward()
    assert rel(y, lora_linear_reference(x, W, b, A, B, 1.0)) < TOL[torch.float32]


def test_env_forces_torch(monkeypatch):
    _forbid_triton(monkeypatch)
    monkeypatch.setenv("CORDA_KERNELS_BACKEND", "torch")
    x, W, b, A, B = make(50, 37, 29, 3, torch.float32)
    A.requires_grad_()
    y = ops.lora_linear(x, W, b, A, B, 1.0, backend="triton")
    y.sum().backward()
    assert rel(y, lora_linear_reference(x, W, b, A, B, 1.0)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments(backend):
    x, W, b, A, B = make(50, 37, 29, 3, torch.float32)
    f = ops.lora_linear
    with pytest.raises(ValueError, match="weight must be"):
        f(x, W[:, :-1], b, A, B, 1.0, backend=backend)
    with pytest.raises(ValueError, match="lora_A must be"):
        f(x, W, b, A[:, :-1], B, 1.0, backend=backend)
    with pytest.raises(ValueError, match="lora_A must be"):
        f(x, W, b, A, B[:-1], 1.0, backend=backend)
    with pytest.raises(ValueError, match="lora_A must be"):
        f(x, W, b, A, B[:, :-1], 1.0, backend=backend)
    with pytest.raises(ValueError, match="bias must be"):
        f(x, W, b[:-1], A, B, 1.0, backend=backend)
    with pytest.raises(ValueError, match="dropout_p"):
        f(x, W, b, A, B, 1.0, dropout_p=1.0, backend=backend)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., K\)"):
        f(x[0, 0], W, b, A, B, 1.0, backend=backend)  # a 0-dim x
    with pytest.raises(ValueError, match=r"weight \(N, K\)"):
        f(x, W[0], b, A, B, 1.0, backend=backend)
    with pytest.raises(TypeError, match="must be float32, float16, bfloat16 or float64"):
        f(x.int(), W, b, A, B, 1.0, backend=backend)
    if backend == "triton":  # float64 is the torch path's alone
        with pytest.raises(TypeError, match="use backend='torch'"):
            f(x.double(), W.double(), b.double(), A.double(), B.double(), 1.0, backend=backend)
    with pytest.raises(TypeError, match="lora_A is torch.float16 but x is torch.float32"):
        f(x, W, b, A.half(), B, 1.0, backend=backend)
    with pytest.raises(TypeError, match="bias is"):
        f(x, W, b.half(), A, B, 1.0, backend=backend)
    with pytest.raises(ValueError, match=f"lora_B is on meta but x is on {x.device}"):
        f(x, W, b, A, B.to("meta"), 1.0, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        f(x, W, b, A, B, 1.0, backend="gpu")


def test_tf32_switch_is_read_through_either_torch_api():
    # Since torch 2.9, reading the legacy allow_tf32 raises once fp32_precision was set (transformers'
    # tf32=True does that); the kernels' precision choice must work under both. Own process: the
    # switch is global.
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from corda_kernels.ops._backend import tf32_matmul\n"
        "assert tf32_matmul() is False\n"
        "torch.backends.cuda.matmul.allow_tf32 = True\n"
        "assert tf32_matmul() is True\n"
        "torch.backends.cuda.matmul.allow_tf32 = False\n"
        "if hasattr(torch.backends.cuda.matmul, 'fp32_precision'):\n"
        "    torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
        "    assert tf32_matmul() is True\n"
        "    torch.backends.cuda.matmul.fp32_precision = 'ieee'\n"
        "    assert tf32_matmul() is False\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_autotune_switch_keeps_only_the_smallest_config(monkeypatch):
    # CORDA_KERNELS_AUTOTUNE=0 (gpu_check.sh's test run): one config that fits any GPU, no tuning.
    triton = pytest.importorskip("triton")
    from corda_kernels.ops._backend import tuning_configs

    cfgs = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "GROUP_M": 1}, num_warps=4, num_stages=3),
    ]
    monkeypatch.delenv("CORDA_KERNELS_AUTOTUNE", raising=False)
    assert tuning_configs(cfgs) == cfgs
    monkeypatch.setenv("CORDA_KERNELS_AUTOTUNE", "0")
    assert tuning_configs(cfgs) == [cfgs[2]]


def test_float64_operands_take_the_torch_path():
    # A float64 model (or one moved with .double() after build_corda) still runs, under backend="auto".
    x, W, b, A, B = make(50, 37, 29, 3, torch.float64)
    y, dy, (x1, A1, B1), _, _, (xr, Ar, Br), wr, br = run(x, W, b, A, B, 0.7, "auto")
    yr = lora_linear_reference(xr, wr, br, Ar, Br, 0.7)
    yr.backward(dy.double())
    assert y.dtype == torch.float64
    for got, ref in ((y, yr), (x1.grad, xr.grad), (A1.grad, Ar.grad), (B1.grad, Br.grad)):
        assert rel(got, ref) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_the_operands_like_f_linear(backend):
    # Mixed-precision training: fp32 parameters, autocast to a 16-bit dtype. Plain nn.Linear returns
    # the autocast dtype; the op must too, and the gradients must reach the fp32 parameters. The
    # interpreter mishandles bf16, so the Triton path is checked in fp16 off a GPU.
    amp = torch.bfloat16 if (backend == "torch" or CUDA) else torch.float16
    x, W, b, A, B = make(50, 37, 29, 3, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    with torch.autocast(DEV, dtype=amp):
        y = ops.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 0.7, backend=backend)
        assert y.dtype == torch.nn.functional.linear(x, W, b).dtype == amp
    dy = torch.randn_like(y)
    y.backward(dy)
    # The reference runs on the same 16-bit-rounded operands, in float64.
    rounded = [t.to(amp) for t in (x, W, b, A, B)]
    refs = [t.double().requires_grad_() for t in (rounded[0], rounded[3], rounded[4])]
    ref = lora_linear_reference(refs[0], rounded[1], rounded[2], refs[1], refs[2], 0.7)
    ref.backward(dy.double())
    tol = TOL[amp]
    assert rel(y, ref) < tol
    for got, want in zip(leaves, refs):
        assert got.grad.dtype == torch.float32
        assert rel(got.grad, want.grad) < tol


def test_inductor_compiled_dropout_gradients_equal_eager():
    # torch 2.13's inductor drops add_(..., alpha=) after a matmul: the input gradient lost its
    # 1/(1-p) under dropout. fallback_random makes the compiled graph draw eager's masks.
    pytest.importorskip("torch._inductor")
    x, W, _, A, B = make(20, 9, 12, 3, torch.float32)

    def step(x, A, B):
        return ops.lora_linear(x, W, None, A, B, 0.7, dropout_p=0.3, backend="torch")

    grads = []
    for fn in (step, torch.compile(step)):
        torch.manual_seed(0)
        leaves = [t.clone().requires_grad_() for t in (x, A, B)]
        with torch._inductor.config.patch(fallback_random=True):
            fn(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(grads[1], grads[0]):
        assert rel(got, want) < 1e-5


def _eager_then_compiled(step, inputs, compiler="aot_eager"):
    """([y, *grads] eager, the same under torch.compile(fullgraph=True)), each run from seed 0 so both
    draw the same dropout masks (the eager and aot_eager backends run the traced ops as they are)."""
    torch._dynamo.reset()
    results = []
    for fn in (step, torch.compile(step, backend=compiler, fullgraph=True)):
        torch.manual_seed(0)
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.float().square().sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    return results


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiled_gradients_equal_eager(compiler, bias, p):
    # torch 2.11's Dynamo gave all-zero gradients for a Function whose forward modified its output
    # in place (pytorch#180642); the torch path then trained nothing when compiled. fullgraph: the
    # op must trace whole.
    x, W, b, A, B = make(20, 9, 12, 3, torch.float32, bias)
    x = x.reshape(4, 5, 12)  # the reshapes around the Function are traced too

    def step(x, A, B):
        return ops.lora_linear(x, W, b, A, B, 0.7, dropout_p=p, backend="torch")

    eager, compiled = _eager_then_compiled(step, (x, A, B), compiler)
    for got, want in zip(compiled, eager):
        assert want.abs().max() > 0
        assert rel(got, want) < 1e-6


@pytest.mark.parametrize("limit", [0, 64])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiled_triton_path_equals_eager(monkeypatch, limit, p):
    # torch 2.11's Dynamo stopped on the autotuned launches themselves (an H200 run; under the
    # interpreter it traced into the interpreter's numpy). As custom ops they trace whole; limit 64
    # sends backward through the dy kernel's op too.
    monkeypatch.setattr(lora_mod, "MAX_FUSED_RANK", limit)
    x, W, b, A, B = make(20, 9, 12, 3, torch.float32)
    x = x.reshape(4, 5, 12)

    def step(x, A, B):
        return ops.lora_linear(x, W, b, A, B, 0.7, dropout_p=p, backend="triton")

    eager, compiled = _eager_then_compiled(step, (x, A, B))
    for got, want in zip(compiled, eager):
        assert want.abs().max() > 0
        assert rel(got, want) < 1e-5  # the dy kernel's atomics may sum in another order on a GPU


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("limit", [0, 64])
def test_compiled_16bit_gradients_equal_eager(monkeypatch, backend, limit):
    # 16-bit operands take other branches (fp32-output GEMMs for the rank-sized products); torch 2.6's
    # Dynamo refused one of them (an is_cuda read) inside the Function in fullgraph mode.
    monkeypatch.setattr(lora_mod, "MAX_FUSED_RANK", limit)
    dtype = torch.bfloat16 if CUDA else torch.float16  # the interpreter mishandles bf16
    x, W, b, A, B = make(20, 9, 12, 3, dtype)

    def step(x, A, B):
        return ops.lora_linear(x, W, b, A, B, 0.7, backend=backend)

    eager, compiled = _eager_then_compiled(step, (x, A, B))
    for got, want in zip(compiled, eager):
        assert want.abs().max() > 0 and got.dtype == want.dtype
        assert rel(got, want) < 1e-3


@pytest.mark.parametrize("with_optional", [False, True])
def test_custom_ops_pass_opcheck(with_optional):
    # Schema, fake (meta) implementation and dispatch of the two ops torch.compile sees.
    x, W, b, A, B = make(20, 9, 12, 3, torch.float32)
    low = torch.randn(20, 3, device=DEV)
    keep = torch.rand(20, 12, device=DEV) > 0.3 if with_optional else None  # dx's shape, (M, K)
    dy = torch.randn(20, 9, device=DEV)
    torch.library.opcheck(
        lora_mod._gemm_lowrank_op, (x, W.t(), b if with_optional else None, low, B.t(), 0.7, None, 1.0)
    )
    torch.library.opcheck(lora_mod._gemm_lowrank_op, (dy, W, None, low, A, 0.7, keep, 1.5))
    torch.library.opcheck(lora_mod._dy_lowrank_op, (dy, B, low if with_optional else None))
    torch.library.opcheck(lora_mod._dy_lowrank_op, (dy, None, low))
    u, db = lora_mod._dy_lowrank_op(dy, None, low)
    assert u.shape == (0, 3) and db.shape == (9, 3)


def test_compiled_forward_leaves_its_output_unmodified(monkeypatch):
    # The check above fails only on torch 2.11 (CI runs another torch): this one pins the fix itself.
    # Traced, the forward must return a fresh tensor, never one it modified in place.
    x, W, b, A, B = make(6, 5, 4, 2, torch.float32)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y, _ = lora_mod.lora_forward_torch(x, W, b, A, B, 0.7, x)
    assert y._version == 0
    assert rel(y, lora_linear_reference(x.double(), W, b, A, B, 0.7)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outer", ["sum", "cube"])
@pytest.mark.parametrize("train_w", [False, True])
def test_second_derivatives_match_the_reference(backend, outer, train_w):
    # A gradient penalty: loss = |∂f/∂x|² + |∂f/∂A|² + |∂f/∂B|² + mean(y²). With f = sum(y) the
    # incoming dy is a constant, and the whole second-order part flows through A, B and x inside the
    # op's own backward; ∂f/∂B reads s = x·Aᵀ, which the fused backward keeps detached.
    x, W, b, A, B = make(7, 5, 6, 2, torch.float32)
    grads = []
    for which in (backend, "reference"):
        dt = torch.float64 if which == "reference" else torch.float32
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, A, B)]
        w = W.detach().to(dt).requires_grad_(train_w)
        bb = b.detach().to(dt).requires_grad_(train_w)
        if which == "reference":
            y = lora_linear_reference(leaves[0], w, bb, leaves[1], leaves[2], 0.5)
        else:
            y = ops.lora_linear(leaves[0], w, bb, leaves[1], leaves[2], 0.5, backend=which)
        f = y.sum() if outer == "sum" else y.pow(3).sum()
        first = torch.autograd.grad(f, leaves, create_graph=True)
        loss = sum(g.square().sum() for g in first) + y.square().mean()
        params = leaves + ([w, bb] if train_w else [])
        grads.append(torch.autograd.grad(loss, params))
    for got, ref in zip(*grads):
        assert rel(got, ref) < 1e-5


def test_second_derivatives_pass_gradgradcheck():
    x, W, b, A, B = (t.double() for t in make(4, 3, 5, 2, torch.float32))
    x, A, B, W = (t.requires_grad_() for t in (x, A, B, W))

    def f(x, A, B, W):
        return ops.lora_linear(x, W, b, A, B, 0.7, backend="torch")

    assert torch.autograd.gradgradcheck(f, (x, A, B, W))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_refuse_what_forward_did_not_keep(backend):
    x, W, b, A, B = make(7, 5, 6, 2, torch.float32)
    cases = [
        # dropout: the kept input is a copy outside the graph
        (dict(dropout_p=0.3), (True, True, True), "dropout_p"),
        # lora_B trained with lora_A frozen: forward kept s, not the input it came from
        (dict(), (True, False, True), "lora_A"),
    ]
    for kwargs, needs, match in cases:
        leaves = [t.clone().requires_grad_(n) for t, n in zip((x, A, B), needs)]
        y = ops.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 0.5, backend=backend, **kwargs)
        with pytest.raises(RuntimeError, match=match):
            torch.autograd.grad(y.sum(), leaves[0], create_graph=True)
    # without create_graph the same setups differentiate once, as always
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    ops.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 0.5, dropout_p=0.3, backend=backend).sum().backward()
    assert all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(12,), (3, 4)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_output_may_be_modified_in_place(backend, lead, p):
    # Models write into linear outputs (Falcon adds to its attention projections): autograd
    # forbids that on a view created inside a custom Function, so the output must not be one.
    _, W, b, A, B = make(12, 9, 7, 3, torch.float32)
    x = torch.randn(*lead, 7, device=DEV)
    grads = []
    for in_place in (False, True):
        torch.manual_seed(3)  # the same dropout mask for both runs
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        y = ops.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 0.5, dropout_p=p, backend=backend)
        if in_place:
            y.mul_(2.0)
        else:
            y = y * 2.0
        y.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for got, ref in zip(*grads):
        assert rel(got, ref) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_a_bias_that_is_not_contiguous(backend, layout):
    # The kernel reads the bias with unit stride: a strided or stride-0 bias must be made contiguous
    # first (it read every other element, or past the end of a one-element allocation).
    x, W, _, A, B = make(50, 29, 31, 3, torch.float32)
    b = torch.randn(58, device=DEV)[::2] if layout == "strided" else torch.randn(1, device=DEV).expand(29)
    y = ops.lora_linear(x, W, b, A, B, 1.5, backend=backend)
    assert rel(y, lora_linear_reference(x, W, b, A, B, 1.5)) < TOL[torch.float32]


def test_env_triton_leaves_an_explicit_torch_and_unsupported_dtypes_alone(monkeypatch):
    monkeypatch.setenv("CORDA_KERNELS_BACKEND", "triton")
    x, W, b, A, B = make(20, 9, 11, 2, torch.float64)
    assert rel(ops.lora_linear(x, W, b, A, B, 1.0), lora_linear_reference(x, W, b, A, B, 1.0)) < 1e-12  # auto
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, W, b, A, B = (t.float() for t in (x, W, b, A, B))
    if not CUDA:  # on CPU tensors, only an explicit backend="torch" can run without the interpreter
        assert (
            rel(ops.lora_linear(x, W, b, A, B, 1.0, backend="torch"), lora_linear_reference(x, W, b, A, B, 1.0)) < 1e-5
        )
    acc = torch.zeros(11, 11, device=DEV)
    ops.covariance_update(acc, x, backend="torch")
    assert rel(ops.covariance_result(acc), x.double().T @ x.double()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M,N,K", [(6, 5, 0), (6, 0, 4), (0, 5, 4)])
def test_zero_sized_dimensions(backend, M, N, K):
    x, W, b, A, B = make(M, N, K, 2, torch.float32)
    leaves = [t.requires_grad_() for t in (x, A, B)]
    y = ops.lora_linear(x, W, b, A, B, 1.0, backend=backend)
    ref = torch.nn.functional.linear(x.detach(), W, b) + (x.detach() @ A.detach().T) @ B.detach().T
    assert y.shape == (M, N) and torch.allclose(y, ref)
    y.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)


def test_backward_saves_only_what_the_asked_gradients_read():
    x, W, b, A, B = make(40, 24, 28, 3, torch.float32)
    A.requires_grad_()  # only dA: the mask (for dx) and s (for dB) are not needed
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lora_linear(x, W, b, A, B, 1.0, dropout_p=0.3, backend="torch")
    assert not any(t.dtype == torch.bool for t in saved)  # the dropout mask
    assert not any(tuple(t.shape) == (40, 3) for t in saved)  # s = x·Aᵀ
    y.sum().backward()
    assert A.grad is not None
