"""Every GPU autotune config of every kernel, run one at a time against a float64 reference.

On a GPU the autotuner picks among GPU_TILES / GEMM_GPU_TILES / DY_GPU_TILES, but the
interpreter (and CORDA_KERNELS_AUTOTUNE=0) only ever runs one small config, so a
tile-size-dependent bug (a mask that only matters when a tile is wider than the
problem, the triangle walk with 128-wide tiles, GROUP_M ordering, several rank chunks)
would first show on a GPU. Here each config is forced in turn: the autotuned launcher
is swapped for the plain jit kernel with that config's tile sizes. Under the
interpreter this proves the arithmetic of each config on the CPU; on a GPU
(bench/gpu_check.sh) it also runs each one on real hardware, warps and stages included.
Shapes are ragged against every tile size and keep the interpreter quick.
"""

import pytest
import torch
from conftest import CUDA

from corda_kernels import ops
from corda_kernels.ops import covariance as cov_mod
from corda_kernels.ops import lora as lora_mod
from corda_kernels.ops._backend import tensor_descriptor_class
from corda_kernels.ops.covariance import covariance_reference
from corda_kernels.ops.lora import lora_linear_reference

pytest.importorskip("triton")

DEV = "cuda" if CUDA else "cpu"
# On a GPU every config costs a compile per dtype and specialization, inside gpu_check.sh's
# time cap: there only bf16 runs (the dtype the interpreter cannot check); fp32 and fp16
# are covered here on the CPU and by the other kernel tests on the GPU.
DTYPES = [torch.bfloat16] if CUDA else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


class Fixed:
    """Stands in for a ``triton.autotune`` object: launches the jit kernel with one config.

    The config's tile sizes join the launch's keyword arguments, so the launcher's grid
    callable sees them in ``meta`` exactly as the autotuner would pass them.
    """

    def __init__(self, kernel, tiles: dict, num_warps: int, num_stages: int, pre_hook=None):
        self.kernel, self.tiles, self.pre_hook = kernel, tiles, pre_hook
        self.opts = {} if not CUDA else {"num_warps": num_warps, "num_stages": num_stages}
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            if self.pre_hook is not None:  # as the autotuner calls it: every argument by name
                self.pre_hook({**dict(zip(self.kernel.arg_names, args)), **kwargs, **self.tiles})
            return self.kernel[grid](*args, **kwargs, **self.tiles, **self.opts)

        return launch


def _tma_usable():
    if tensor_descriptor_class() is None:
        return False
    return torch.cuda.get_device_capability()[0] >= 9 if CUDA else True


needs_tma = pytest.mark.skipif(not _tma_usable(), reason="TMA descriptors need Triton >= 3.4 and, on a GPU, sm_90+")


@pytest.fixture
def tma_on(monkeypatch):
    # Descriptors wherever a layout allows them (CORDA_KERNELS_TMA=1: the interpreter and dx's GEMM too),
    # for these small shapes as well (the launchers skip shapes the autotuner leaves untuned), whatever
    # CORDA_KERNELS_AUTOTUNE the run has.
    monkeypatch.setenv("CORDA_KERNELS_TMA", "1")
    monkeypatch.setenv("CORDA_KERNELS_AUTOTUNE", "1")
    monkeypatch.setattr(lora_mod, "SMALL_GEMM", 0)
    monkeypatch.setattr(cov_mod, "SMALL_D", 0)
    monkeypatch.setattr(cov_mod, "TMA_MIN_MACS", 0)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all()
    return ((got - ref).norm() / ref.norm()).item()


def test_tile_tables_are_what_the_autotuner_would_use(monkeypatch):
    # The tests below run the tables; this checks that the autotuners' GPU candidates are exactly
    # the tables (built here as on a GPU: interpreter off, autotuning on).
    monkeypatch.setattr(cov_mod, "interpreting", lambda: False)
    monkeypatch.setattr(lora_mod, "interpreting", lambda: False)
    monkeypatch.setenv("CORDA_KERNELS_AUTOTUNE", "1")

    def table(configs, keys):
        return [tuple(c.kwargs[k] for k in keys) + (c.num_warps, c.num_stages) for c in configs]

    cov = table(cov_mod._cov_configs(), ["BLOCK_D", "WIDE", "BLOCK_R", "USE_TMA"])
    assert cov == [t[:3] + (False,) + t[3:] for t in cov_mod.GPU_TILES] + [
        t[:3] + (True,) + t[3:] for t in cov_mod.TMA_TILES
    ]
    assert all(c.pre_hook is cov_mod._tma_blocks for c in cov_mod._cov_configs() if c.kwargs["USE_TMA"])
    gemm = table(lora_mod._gemm_configs(), ["BLOCK_M", "BLOCK_N", "BLOCK_K", "USE_TMA", "PERSISTENT"])
    assert gemm == [t[:3] + (False, False) + t[3:] for t in lora_mod.GEMM_GPU_TILES] + [
        t[:3] + (True, bool(t[5])) + t[3:5] for t in lora_mod.GEMM_TMA_TILES
    ]
    assert all(c.pre_hook is lora_mod._tma_blocks for c in lora_mod._gemm_configs() if c.kwargs["USE_TMA"])
    assert table(lora_mod._dy_configs(), ["BLOCK_M", "BLOCK_N"]) == list(lora_mod.DY_GPU_TILES)


@pytest.mark.parametrize(
    "tuned", [cov_mod._cov_triangle_tuned, lora_mod._gemm_lowrank_tuned, lora_mod._dy_lowrank_tuned]
)
def test_autotune_keys_name_kernel_arguments(tuned):
    # Triton drops a key name that is not an argument without a word, and then one tuned config
    # serves launches it was never timed on (a different rank tile, epilogue or layout).
    assert tuned.keys and set(tuned.keys) <= set(tuned.fn.arg_names), tuned.keys


@pytest.mark.parametrize(
    "tile", cov_mod.GPU_TILES, ids=lambda t: "D{}x{}-R{}-w{}-s{}".format(t[0], t[0] * t[1], *t[2:])
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_covariance_every_tile(monkeypatch, tile, dtype):
    bd, wide, br, warps, stages = tile
    fixed = Fixed(cov_mod._cov_triangle_kernel, {"BLOCK_D": bd, "WIDE": wide, "BLOCK_R": br, "USE_TMA": False},
                  warps, stages)  # fmt: skip
    monkeypatch.setattr(cov_mod, "_cov_triangle_tuned", fixed)
    # d = 129 is ragged against 32, 64 and 128 and gives a triangle of several tiles at each;
    # three sequences of 70 rows from a view whose sequences are not back to back (a transposed
    # (T, B, d + 11) buffer, sliced), so rows are found through the kernel's divmod path.
    d, B, T = 129, 3, 70
    x = torch.randn(T, B, d + 11, device=DEV).to(dtype).transpose(0, 1)[..., 5 : 5 + d]
    mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
    mask[0] = False  # with sequence 1's start, a padding run longer than any BLOCK_R
    mask[1, :10] = False
    mask[2, 50:] = False
    scale = torch.rand(B, device=DEV) + 0.5
    acc = torch.randn(d, d, device=DEV)  # the kernel adds into acc's triangle
    start = ops.covariance_result(acc).double().cpu()
    ops.covariance_update(acc, x, mask, scale=scale, backend="triton")
    ops.covariance_update(acc, x[:, :33], backend="triton")  # a second call, no mask, ragged rows
    ref = covariance_reference(x, mask, scale).cpu() + covariance_reference(x[:, :33]).cpu()
    assert fixed.launches == 2
    assert rel(ops.covariance_result(acc).double().cpu() - start, ref) < TOL[dtype]


@needs_tma
@pytest.mark.parametrize(
    "tile", cov_mod.TMA_TILES, ids=lambda t: "D{}x{}-R{}-w{}-s{}".format(t[0], t[0] * t[1], *t[2:])
)
def test_covariance_every_tma_tile(monkeypatch, tma_on, tile):
    bd, wide, br, warps, stages = tile
    tiles = {"BLOCK_D": bd, "WIDE": wide, "BLOCK_R": br, "USE_TMA": True}
    fixed = Fixed(cov_mod._cov_triangle_kernel, tiles, warps, stages, pre_hook=cov_mod._tma_blocks)
    monkeypatch.setattr(cov_mod, "_cov_triangle_tuned", fixed)
    dtype = torch.bfloat16 if CUDA else torch.float16
    # d = 264 keeps rows on 16-byte boundaries, as TMA needs, is ragged against every tile and
    # gives wide tiles two columns; 150 rows leave a partial row chunk at every BLOCK_R. The
    # second update is a (B, T, d) batch whose sequences sit back to back, read as one matrix;
    # the third, rows spaced wider than d.
    d = 264
    x = torch.randn(150, d, device=DEV).to(dtype)
    xb = torch.randn(3, 41, d, device=DEV).to(dtype)
    xs = torch.randn(70, 3, d, device=DEV).to(dtype)[:, 1]  # rows 3·d apart, off the storage's start
    acc = torch.randn(d, d, device=DEV)
    start = ops.covariance_result(acc).double().cpu()
    ops.covariance_update(acc, x, backend="triton")
    ops.covariance_update(acc, xb, backend="triton")
    ops.covariance_update(acc, xs, backend="triton")
    assert fixed.launches == 3  # all through descriptors: the pre-hook needs them
    ref = covariance_reference(x).cpu() + covariance_reference(xb).cpu() + covariance_reference(xs).cpu()
    assert rel(ops.covariance_result(acc).double().cpu() - start, ref) < TOL[dtype]


@needs_tma
def test_covariance_descriptors_only_for_plain_rows(monkeypatch, tma_on):
    # Masked, scaled, strided-sequence and misaligned updates keep pointer loads (TMA_OK = 0).
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                named = dict(zip(cov_mod._cov_triangle_kernel.arg_names, args))
                seen.append((named["xa_desc"] is not None, named["TMA_OK"]))

            return launch

    monkeypatch.setattr(cov_mod, "_cov_triangle_tuned", Spy())
    dt = torch.bfloat16 if CUDA else torch.float16
    d = 136
    x = torch.randn(4, 50, d, device=DEV).to(dt)
    acc = torch.zeros(d, d, device=DEV)
    ops.covariance_update(acc, x, backend="triton")
    ops.covariance_update(acc, x[:, 0], backend="triton")  # one row per sequence: rows 50·d apart
    ops.covariance_update(acc, x, torch.ones(4, 50, dtype=torch.bool, device=DEV), backend="triton")
    ops.covariance_update(acc, x, scale=torch.rand(4, device=DEV), backend="triton")
    ops.covariance_update(acc, x[:, :30], backend="triton")  # sequences not back to back
    ops.covariance_update(acc, torch.randn(50, d + 3, device=DEV).to(dt)[:, 3:], backend="triton")
    ops.covariance_update(acc, x.float(), backend="triton")
    assert seen == [(True, 1), (True, 1)] + [(False, 0)] * 5
    monkeypatch.setattr(cov_mod, "SMALL_D", d)  # a triangle left untuned
    ops.covariance_update(acc, x, backend="triton")
    assert seen[-1] == (False, 0)
    monkeypatch.setattr(cov_mod, "SMALL_D", 0)
    monkeypatch.setattr(cov_mod, "TMA_MIN_MACS", 200 * d * d + 1)  # an update too small to gain
    ops.covariance_update(acc, x, backend="triton")
    assert seen[-1] == (True, 1)  # CORDA_KERNELS_TMA=1: TMA below the threshold too
    with monkeypatch.context() as m:
        m.delenv("CORDA_KERNELS_TMA")
        m.setattr(cov_mod, "tma_device", lambda t: True)  # the default on a Hopper GPU
        ops.covariance_update(acc, x, backend="triton")
        assert seen[-1] == (False, 0)
        m.setattr(cov_mod, "TMA_MIN_MACS", 200 * d * d)
        ops.covariance_update(acc, x, backend="triton")
        assert seen[-1] == (True, 1)
        # Whatever the size, the device check has the last word (test_tma_default_by_device_and_setting).
        m.setattr(cov_mod, "tma_device", lambda t: False)
        ops.covariance_update(acc, x, backend="triton")
        assert seen[-1] == (False, 0)


def test_covariance_prune_drops_tma_configs_without_descriptors():
    pointer = [cov_mod._cov_config(*t) for t in cov_mod.GPU_TILES]
    configs = pointer + [cov_mod._cov_config(*t, tma=True) for t in cov_mod.TMA_TILES]
    assert cov_mod._cov_prune(configs, {"D": 4096, "TMA_OK": 0}) == pointer
    assert cov_mod._cov_prune(configs, {"D": 4096, "TMA_OK": 1}) == configs
    small = cov_mod._cov_prune(configs, {"D": 300, "TMA_OK": 1})
    assert len(small) == 1 and not small[0].kwargs["USE_TMA"]


def _adapter_matches_reference(fixed, x, N, rank, dropout_p):
    """lora_linear through the forced config ``fixed``: output and every gradient against float64."""
    dtype, K = x.dtype, x.shape[-1]
    W = (torch.randn(N, K, device=DEV) / K**0.5).to(dtype)
    b = torch.randn(N, device=DEV).to(dtype)
    A = (torch.randn(rank, K, device=DEV) / K**0.5).to(dtype)
    Bm = (torch.randn(N, rank, device=DEV) / rank**0.5).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, A, Bm)]
    torch.manual_seed(7)
    y = ops.lora_linear(leaves[0], W, b, leaves[1], leaves[2], 1.7, dropout_p=dropout_p, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert fixed.launches == 2  # forward and dx

    keep = None
    if dropout_p:
        torch.manual_seed(7)  # the same mask as the op drew
        keep = torch.rand_like(x.reshape(-1, K), dtype=torch.float32) >= dropout_p
        keep = keep.reshape(x.shape)
    refs = [t.detach().double().requires_grad_() for t in (x, A, Bm)]
    yr = lora_linear_reference(refs[0], W, b, refs[1], refs[2], 1.7, keep=keep, dropout_p=dropout_p)
    yr.backward(dy.double())
    assert rel(y, yr) < TOL[dtype]
    for got, ref in zip(leaves, refs):
        assert rel(got.grad, ref.grad) < TOL[dtype]


def _gemm_tile_id(t):
    return "M{}-N{}-K{}-w{}-s{}".format(*t)


@pytest.mark.parametrize("tile", lora_mod.GEMM_GPU_TILES, ids=_gemm_tile_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, dropout_p", [(5, 0.0), (70, 0.2)])
def test_adapter_gemm_every_tile(monkeypatch, tile, dtype, rank, dropout_p):
    bm, bn, bk, warps, stages = tile
    tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": False, "PERSISTENT": False}
    fixed = Fixed(lora_mod._gemm_lowrank_kernel, tiles, warps, stages)
    monkeypatch.setattr(lora_mod, "_gemm_lowrank_tuned", fixed)
    # M = 300 and N = 257 are ragged against every tile and give several row groups;
    # K = 70 leaves a partial K step; rank 70 takes two chunks of the 64-wide rank tile.
    M, N, K = 300, 257, 70
    x = torch.randn(4, M // 4, 2 * K, device=DEV).to(dtype)[..., ::2]  # non-contiguous
    _adapter_matches_reference(fixed, x, N, rank, dropout_p)


@needs_tma
@pytest.mark.parametrize("tile", lora_mod.GEMM_TMA_TILES, ids=lambda t: "M{}-N{}-K{}-w{}-s{}-p{}".format(*t))
@pytest.mark.parametrize("dtype", [torch.bfloat16] if CUDA else [torch.float16])
@pytest.mark.parametrize("rank, dropout_p", [(5, 0.0), (70, 0.2)])
def test_adapter_gemm_every_tma_tile(monkeypatch, tma_on, tile, dtype, rank, dropout_p):
    bm, bn, bk, warps, stages, persistent = tile
    tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": True, "PERSISTENT": bool(persistent)}
    fixed = Fixed(lora_mod._gemm_lowrank_kernel, tiles, warps, stages, pre_hook=lora_mod._tma_blocks)
    monkeypatch.setattr(lora_mod, "_gemm_lowrank_tuned", fixed)
    # Rows on 16-byte boundaries (K = 72, N = 264 halves), as TMA needs, yet ragged against every
    # tile: the copy engine's zero fill past M, N and K stands in for the pointer path's masks.
    # The persistent configs run 3 programs under the interpreter, each walking several tiles.
    M, N, K = 300, 264, 72
    x = torch.randn(3, M // 3, K, device=DEV).to(dtype)
    _adapter_matches_reference(fixed, x, N, rank, dropout_p)  # both launches: the pre-hook needs descriptors


@needs_tma
def test_tma_descriptors_only_where_the_layout_allows(monkeypatch, tma_on):
    dt = torch.bfloat16 if CUDA else torch.float16
    W = torch.randn(264, 72, device=DEV).to(dt)
    x = torch.randn(300, 72, device=DEV).to(dt)
    xd, wd, w_nk = lora_mod._tma_descriptors(x, W.t())  # forward: Wt is a view of W
    assert xd is not None and wd is not None and w_nk and wd.base.data_ptr() == W.data_ptr()
    xd, wd, w_nk = lora_mod._tma_descriptors(torch.randn(300, 264, device=DEV).to(dt), W)  # dx: W as it is
    assert wd is not None and not w_nk
    # Rows off 16-byte boundaries, a strided inner dim, fp32, and the switch: pointer loads.
    assert lora_mod._tma_descriptors(torch.randn(300, 70, device=DEV).to(dt), W[:, :70].t())[0] is None
    assert lora_mod._tma_descriptors(torch.randn(300, 144, device=DEV).to(dt)[:, ::2], W.t())[0] is None
    assert lora_mod._tma_descriptors(x.float(), W.float().t())[0] is None
    assert lora_mod._tma_descriptors(x[:1].expand(300, 72), W.t())[0] is None  # one row, broadcast
    shifted = torch.randn(300 * 72 + 8, device=DEV).to(dt)[1 : 1 + 300 * 72].view(300, 72)
    assert lora_mod._tma_descriptors(shifted, W.t())[0] is None  # base 2 bytes past a 16-byte boundary
    monkeypatch.setattr(lora_mod, "SMALL_GEMM", 300 * 72 * 264)  # a GEMM left untuned: no descriptors
    assert lora_mod._tma_descriptors(x, W.t())[0] is None
    monkeypatch.setattr(lora_mod, "SMALL_GEMM", 300 * 72 * 264 - 1)
    assert lora_mod._tma_descriptors(x, W.t())[0] is not None
    monkeypatch.setenv("CORDA_KERNELS_AUTOTUNE", "0")  # one pointer config only
    assert lora_mod._tma_descriptors(x, W.t())[0] is None
    monkeypatch.setenv("CORDA_KERNELS_AUTOTUNE", "1")
    for off in ("0", "off"):
        monkeypatch.setenv("CORDA_KERNELS_TMA", off)
        assert lora_mod._tma_descriptors(x, W.t())[0] is None
    monkeypatch.delenv("CORDA_KERNELS_TMA")
    # The default: the forward GEMM on Hopper GPUs, not dx's (W as it is), and the interpreter only
    # when asked for by name.
    assert (lora_mod._tma_descriptors(x, W.t())[0] is not None) == CUDA
    monkeypatch.setattr(lora_mod, "tma_device", lambda t: True)  # a Hopper GPU, also on the CPU
    assert lora_mod._tma_descriptors(x, W.t())[0] is not None
    assert lora_mod._tma_descriptors(torch.randn(300, 264, device=DEV).to(dt), W)[0] is None


def test_tma_default_by_device_and_setting(monkeypatch):
    # On by default on sm_90 only (the one chip timed); CORDA_KERNELS_TMA=0 turns it off there,
    # =1 turns it on for newer chips and the interpreter; any other value is the default.
    from types import SimpleNamespace

    from corda_kernels.ops import _backend

    if tensor_descriptor_class() is None:
        pytest.skip("this Triton has no TMA descriptors")
    gpu = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("CORDA_KERNELS_AUTOTUNE", "1")
    for setting in (None, "", "auto", "garbage", "0", "off", "False", "no", "1", "on", "TRUE", "yes"):
        if setting is None:
            monkeypatch.delenv("CORDA_KERNELS_TMA", raising=False)
        else:
            monkeypatch.setenv("CORDA_KERNELS_TMA", setting)
        off = setting is not None and setting.lower() in ("0", "off", "false", "no")
        asked = setting is not None and setting.lower() in ("1", "on", "true", "yes")
        assert _backend.tma_requested() == asked, setting
        for major, expected in ((8, False), (9, not off), (10, asked), (12, asked)):
            monkeypatch.setattr(_backend, "_capability", lambda index, major=major: (major, 0))
            assert _backend.tma_device(gpu) == expected, (setting, major)
        assert _backend.tma_device(cpu) == asked, setting
    monkeypatch.setenv("CORDA_KERNELS_AUTOTUNE", "0")  # one pointer config: descriptors would go unread
    monkeypatch.setattr(_backend, "_capability", lambda index: (9, 0))
    assert not _backend.tma_device(gpu)


def test_covariance_tma_threshold_sits_between_the_measured_updates():
    # H200, 2026-11-30: TMA lost at 2048 rows × d = 4096 and won at 2048 rows × d = 11008.
    assert 2048 * 4096**2 < cov_mod.TMA_MIN_MACS <= 2048 * 11008**2


def test_gemm_prune_drops_tma_configs_without_descriptors():
    configs = [lora_mod._gemm_config(*t) for t in lora_mod.GEMM_GPU_TILES] + [
        lora_mod._gemm_config(*t[:5], tma=True, persistent=bool(t[5])) for t in lora_mod.GEMM_TMA_TILES
    ]
    big = {"M": 8192, "N": 4096, "K": 4096}
    kept = lora_mod._gemm_prune(configs, {**big, "TMA_OK": 0})
    assert kept == configs[: len(lora_mod.GEMM_GPU_TILES)]
    assert lora_mod._gemm_prune(configs, {**big, "TMA_OK": 1}) == configs


@pytest.mark.parametrize("tile", lora_mod.DY_GPU_TILES, ids=lambda t: "M{}-N{}-w{}-s{}".format(*t))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [5, 64, 100])
def test_dy_kernel_every_tile(monkeypatch, tile, dtype, rank):
    bm, bn, warps, stages = tile
    fixed = Fixed(lora_mod._dy_lowrank_kernel, {"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages)
    monkeypatch.setattr(lora_mod, "_dy_lowrank_tuned", fixed)
    # M = 300 over 3 row chunks leaves a ragged last chunk at every BLOCK_M; N = 257 a ragged
    # column strip; rank 100 pads to a 128-wide rank tile.
    M, N = 300, 257
    dy = torch.randn(M, 2 * N, device=DEV).to(dtype)[:, ::2]
    B = (torch.randn(N, rank, device=DEV) / rank**0.5).to(dtype)
    s = torch.randn(M, rank, device=DEV).to(dtype)
    u, db = lora_mod._dy_lowrank(dy, B, s, chunks=3)
    assert fixed.launches == 1
    assert rel(u, dy.double() @ B.double()) < TOL[dtype]
    assert rel(db, dy.double().t() @ s.double()) < TOL[dtype]


@pytest.mark.parametrize("wide", [1, 2])
def test_triangle_walk_covers_each_upper_entry_once(monkeypatch, wide):
    # Small tiles over a wide matrix make a long walk (990 tiles at WIDE=1, 506 at WIDE=2), where
    # the float square root that maps a program id to its column is most likely to be off by one:
    # a tile computed twice doubles its entries, a tile skipped leaves them at zero.
    if CUDA:
        pytest.skip("the walk is the same on a GPU; this is an interpreter check of the index arithmetic")
    fixed = Fixed(cov_mod._cov_triangle_kernel, {"BLOCK_D": 16, "WIDE": wide, "BLOCK_R": 16, "USE_TMA": False}, 4, 1)
    monkeypatch.setattr(cov_mod, "_cov_triangle_tuned", fixed)
    d = 700
    x = torch.randn(3, d)
    acc = torch.zeros(d, d)
    ops.covariance_update(acc, x, backend="triton")
    ref = covariance_reference(x)
    upper = torch.ones(d, d, dtype=torch.bool).triu()
    assert torch.allclose(acc[upper].double(), ref[upper], rtol=1e-5, atol=1e-5)
