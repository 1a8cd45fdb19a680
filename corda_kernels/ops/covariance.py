"""Streaming covariance update: acc += Σ_rows (scale·x)ᵀ(scale·x), upper triangle only.

Layout of the accumulator: only tiles on and above the diagonal are kept up to
date. Entries strictly below the diagonal hold partial sums and must not be
read; ``covariance_result`` mirrors the upper triangle once at the end. Both
backends follow that contract, so an accumulator can be fed by either.

This file holds, top to bottom: the Triton kernel, the launchers (the torch
reference, which is what runs on the CPU, and the Triton one), and the public
entry points.
"""

from __future__ import annotations

import torch

from ._backend import (
    autotune,
    autotune_enabled,
    interpreting,
    on_device,
    resolve,
    tensor_descriptor_class,
    tf32_matmul,
    tma_device,
    tma_requested,
    tma_rows,
    tuning_configs,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the package works without triton, on the torch path
    triton = None
    tl = None

#: Torch triangle update: the (d, d) upper triangle is split in halves
#: recursively; each split adds one off-diagonal block as a single GEMM and
#: recurses into the two diagonal blocks, down to diagonal leaves of at most
#: TORCH_LEAF columns, which take one full ``addmm_``. Split points are rounded
#: to TORCH_ALIGN columns so the BLAS sees aligned panels. Compared with fixed
#: row bands, most of the flops land in a few large, square GEMMs, which run
#: closer to BLAS peak. Speed-up over one full ``addmm_``, fp32, 2048 rows,
#: 2 threads, quiet 2-core dev box, medians of 11 interleaved (2026-11-29):
#:
#:   d          384   512   768   1376  2048  3000
#:   band 192   1.25  1.32  1.32  1.48  1.58  1.51   (the previous default)
#:   leaf 160   1.27  1.40  1.44  1.62  1.73  1.82   (align 64; this default)
#:   leaf 192   1.28  1.41  1.38  1.60  1.77  1.74
#:   leaf 256   1.25  1.25  1.41  1.59  1.65  1.73
#:
#: The ideal is 2x; the diagonal leaves and the smaller GEMMs give back the rest.
TORCH_LEAF = 160
TORCH_ALIGN = 64


def _triangle_recursive(acc: torch.Tensor, xf: torch.Tensor, lo: int, hi: int, leaf: int) -> None:
    if hi - lo <= leaf:
        acc[lo:hi, lo:hi].addmm_(xf[:, lo:hi].T, xf[:, lo:hi])
        return
    mid = lo + -(-((hi - lo) // 2) // TORCH_ALIGN) * TORCH_ALIGN
    if mid >= hi:  # a span just above the leaf size: split at the middle instead
        mid = lo + (hi - lo) // 2
    acc[lo:mid, mid:hi].addmm_(xf[:, lo:mid].T, xf[:, mid:hi])
    _triangle_recursive(acc, xf, lo, mid, leaf)
    _triangle_recursive(acc, xf, mid, hi, leaf)


def _triangle_bands(acc: torch.Tensor, xf: torch.Tensor, band: int) -> None:
    # Row band i only needs columns i: onward; kept for bench_ops.py --sweep and the tests.
    for i in range(0, acc.shape[0], band):
        acc[i : i + band, i:].addmm_(xf[:, i : i + band].T, xf[:, i:])


#: The kernel's autotune candidates on a GPU, as (BLOCK_D, WIDE, BLOCK_R, num_warps,
#: num_stages); a tile is BLOCK_D × WIDE·BLOCK_D. Hopper and Ampere: 128-row tiles feed
#: the tensor cores best for large d, 64-row ones keep enough programs in flight when d is
#: small (a 1024-wide triangle is only 36 tiles of 128). A square tile does BLOCK_D/2
#: flops per byte it stages, a 128×256 one 85: the wide tiles are for when staging from
#: L2 rather than the tensor cores sets the pace. Shared memory per stage is
#: (1 + WIDE)·BLOCK_R·BLOCK_D elements. Under the interpreter one small config runs
#: instead; tests/test_gpu_tiles.py runs each of these there.
GPU_TILES = (
    (128, 1, 64, 8, 3),
    (128, 1, 64, 8, 4),
    (128, 1, 32, 8, 4),
    (128, 1, 64, 4, 3),
    (128, 1, 32, 4, 4),
    # An H200 picked 4 warps at both ends of the stage range (2026-11-29): deeper pipelines and
    # a longer row chunk next to them. The 128-row chunk needs 192 KB of shared memory in bf16,
    # so only Hopper runs it; the autotuner skips configs that do not fit.
    (128, 1, 64, 4, 4),
    (128, 1, 32, 4, 5),
    (128, 1, 128, 4, 3),
    (64, 1, 64, 4, 4),
    (64, 1, 32, 4, 3),
    (64, 1, 64, 8, 3),
    (128, 2, 64, 8, 3),
    (128, 2, 32, 8, 4),
    (64, 2, 64, 4, 4),
)

#: Candidates that read x's panels through TMA descriptors (Hopper and newer), same fields.
#: They apply to unmasked, unscaled 16-bit rows that sit at one stride on 16-byte boundaries
#: (the masked update gathers rows through a list, which TMA on Hopper cannot). They join
#: GPU_TILES in one autotuner unless CORDA_KERNELS_TMA=0; tests/aot_compile.py checks which fit
#: shared memory and that both panels arrive as TMA copies.
TMA_TILES = (
    (128, 1, 64, 8, 3),
    (128, 1, 64, 4, 4),
    (128, 1, 32, 4, 5),
    (128, 1, 128, 4, 3),
    (128, 2, 64, 8, 3),
    (128, 2, 32, 8, 4),
)

#: Triangles of at most this width run one small pointer config, untuned (launch-bound, few
#: tiles: tuning costs more than it wins), and no TMA descriptors are built for them.
SMALL_D = 512
#: Updates of fewer multiply-adds (rows·d²) keep pointer loads. On the H200 (2026-11-30) TMA ran
#: 6-15% faster at 8192 rows (d = 4096, 11008) and at 2048 rows × d = 11008, and 16% slower at
#: 2048 rows × d = 4096, the one update of the four below this line. That row was timed on a
#: GPU still cold from compiling (about 1.8× slow), so the line is provisional;
#: CORDA_KERNELS_TMA=1 ignores it, which is how bench/gpu_bench.py re-measures it.
TMA_MIN_MACS = 1 << 36

ACC_DTYPES = (torch.float32, torch.float64)
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 x takes the torch path


# ----------------------------------------------------------------------------- Triton kernel
# Tiling. The output is a d×d Gram matrix and the reduction runs over rows, so
# each program owns one BLOCK_D×BJ output tile (BJ = WIDE·BLOCK_D, WIDE 1 or 2)
# and streams every row of x through it: the panels a = x[:, i-block] (rows,
# BLOCK_D) and b = x[:, j-block] (rows, BJ) go through tl.dot as aᵀ·b, so the
# reduction lives in registers and each tile of acc is read and written exactly
# once per call, with no atomics, which also keeps the result deterministic.
# Because the matrix is symmetric, the launch grid enumerates only the tiles
# that reach the upper triangle: column block bj (BJ wide) needs row blocks
# bi < WIDE·(bj + 1), WIDE·nb·(nb+1)/2 tiles in all (nb = cdiv(d, BJ)); the
# lower triangle costs neither a program nor, beyond the diagonal tiles' lower
# parts (1/(2·nb) of the work with square tiles), flops. Program ids walk the
# triangle column by column, so programs running side by side share the column
# panel b, which stays in L2 while their row panels a stream past.
#
# Rows may come from a (B, T, d) view with any strides (no copy of x). With a
# mask the kernel walks a list of the kept rows' numbers (KeptRows, built on the
# device without a host sync), so padding costs neither loads nor flops, a NaN
# sitting in padding cannot reach the sum, and the row loop has no data-dependent
# branch: an earlier version skipped all-padding chunks with an `if`, and the
# compiled code showed that the branch kept Triton from pipelining any of the
# loop's loads (no cp.async); gathering through the list keeps them pipelined
# (checked on compiled sm_90 code, tests/aot_compile.py). A per-row scale s is applied to
# both panels before the dot (in fp32, then rounded back to x's dtype so 16-bit
# inputs still run on tensor cores): the tile is then the exact Gram matrix of
# round(s·x), a perturbation of one rounding in x's own dtype, and it stays
# positive semi-definite, which scaling only one side by s² would not.
#
# On Hopper and newer, unmasked and unscaled 16-bit rows at one stride may instead
# arrive through TMA descriptors (USE_TMA configs): the copy engine moves both
# panels into shared memory, zero-filling past the last row and column, so the
# loop carries no address arithmetic or masks.
if triton is not None:

    @triton.jit
    def _cov_rows(
        tile, x_ptr, scale_ptr, rows, row_off, live, col_i, col_j, in_i, in_j,
        HAS_SCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One chunk of rows into the tile: rows not `live` read as zero and are never fetched.
        dt = x_ptr.dtype.element_ty
        a = tl.load(x_ptr + row_off[:, None] + col_i[None, :], mask=live[:, None] & in_i[None, :], other=0.0)
        b = tl.load(x_ptr + row_off[:, None] + col_j[None, :], mask=live[:, None] & in_j[None, :], other=0.0)
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=live, other=0.0)
            a = (a.to(tl.float32) * s[:, None]).to(dt)
            b = (b.to(tl.float32) * s[:, None]).to(dt)
        return tl.dot(tl.trans(a), b, tile, input_precision=INPUT_PRECISION)

    @triton.jit
    def _cov_triangle_kernel(
        acc_ptr,
        x_ptr,
        xa_desc,
        xb_desc,
        idx_ptr,
        count_ptr,
        scale_ptr,
        R,
        T,
        D,
        stride_xb,
        stride_xt,
        stride_xd,
        stride_am,
        stride_an,
        TMA_OK,  # autotuning key only: 1 when xa_desc and xb_desc are given
        HAS_INDEX: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        THREE_D: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr,
        WIDE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        USE_TMA: tl.constexpr,
    ):
        # Program id -> tile (bi, bj); column bj holds WIDE·(bj + 1) tiles, so the columns
        # before it hold WIDE·T(bj) (T(n) = n(n+1)/2) and q = pid // WIDE has T(bj) <= q < T(bj + 1).
        # The float square root may be off by one either way; the two fix-ups settle it.
        pid = tl.program_id(0)
        q = pid // WIDE
        bj = ((tl.sqrt(8.0 * q.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
        bj = tl.where(bj * (bj + 1) // 2 > q, bj - 1, bj)
        bj = tl.where((bj + 1) * (bj + 2) // 2 <= q, bj + 1, bj)
        bi = pid - WIDE * (bj * (bj + 1) // 2)

        BJ: tl.constexpr = WIDE * BLOCK_D
        offs_i = bi * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_j = bj * BJ + tl.arange(0, BJ)
        in_i = offs_i < D
        in_j = offs_j < D
        col_i = offs_i.to(tl.int64) * stride_xd
        col_j = offs_j.to(tl.int64) * stride_xd

        tile = tl.zeros((BLOCK_D, BJ), dtype=tl.float32)
        # With a mask the kept rows arrive as a list of row numbers whose length lives on the
        # device (no host sync to learn it). No branch depends on the data inside the loop:
        # one would stop Triton's software pipeliner from overlapping the loads with the dots.
        if HAS_INDEX:
            n_rows = tl.load(count_ptr)
        else:
            n_rows = R
        # In the last column a wide tile's row block can start past d: nothing to sum there.
        n_rows = tl.where(bi * BLOCK_D < D, n_rows, 0)
        if USE_TMA:
            # Both panels through the copy engine, which zero-fills rows and columns past the end.
            for r0 in range(0, n_rows, BLOCK_R):
                a = xa_desc.load([r0, bi * BLOCK_D])
                b = xb_desc.load([r0, bj * BJ])
                tile = tl.dot(tl.trans(a), b, tile, input_precision=INPUT_PRECISION)
        else:
            for r0 in range(0, n_rows, BLOCK_R):
                pos = r0 + tl.arange(0, BLOCK_R)
                in_r = pos < n_rows
                if HAS_INDEX:
                    rows = tl.load(idx_ptr + pos, mask=in_r, other=0)
                else:
                    rows = pos
                if THREE_D:
                    row_off = (rows // T).to(tl.int64) * stride_xb + (rows % T).to(tl.int64) * stride_xt
                else:
                    row_off = rows.to(tl.int64) * stride_xt
                tile = _cov_rows(
                    tile, x_ptr, scale_ptr, rows, row_off, in_r, col_i, col_j, in_i, in_j,
                    HAS_SCALE, INPUT_PRECISION,
                )  # fmt: skip

        acc_ptrs = acc_ptr + offs_i[:, None].to(tl.int64) * stride_am + offs_j[None, :].to(tl.int64) * stride_an
        in_tile = in_i[:, None] & in_j[None, :]
        old = tl.load(acc_ptrs, mask=in_tile, other=0.0)
        tl.store(acc_ptrs, old + tile.to(old.dtype), mask=in_tile)

    def _tma_blocks(nargs):
        # Autotune pre-hook of the TMA configs: a descriptor carries its tile shape, which is the config's.
        bd, br = nargs["BLOCK_D"], nargs["BLOCK_R"]
        nargs["xa_desc"].block_shape = [br, bd]
        nargs["xb_desc"].block_shape = [br, nargs["WIDE"] * bd]

    def _cov_config(bd, wide, br, w, s, tma=False):
        tiles = {"BLOCK_D": bd, "WIDE": wide, "BLOCK_R": br, "USE_TMA": tma}
        return triton.Config(tiles, num_warps=w, num_stages=s, pre_hook=_tma_blocks if tma else None)

    def _cov_configs():
        if interpreting():
            # The interpreter runs every program in numpy: few, mid-sized tiles are fastest,
            # and autotuning there would only burn time.
            return [_cov_config(32, 1, 32, 4, 1)]
        pointer = [_cov_config(*t) for t in GPU_TILES]
        # Without autotuning only the smallest pointer config remains: it runs on any GPU and layout.
        return tuning_configs(pointer) + ([_cov_config(*t, tma=True) for t in TMA_TILES] if autotune_enabled() else [])

    def _cov_prune(configs, named_args, **kwargs):
        # The TMA configs need descriptors, which the launcher gives only where they work.
        if not named_args["TMA_OK"]:
            configs = [c for c in configs if not c.kwargs["USE_TMA"]]
        # A small triangle is launch-bound and has few tiles: tuning it costs more than it wins.
        d = named_args["D"]
        if d <= SMALL_D and len(configs) > 1:
            small = [
                c for c in configs if c.kwargs["BLOCK_D"] == 64 and c.kwargs["WIDE"] == 1 and not c.kwargs["USE_TMA"]
            ]
            return small[:1] or configs[:1]
        return configs

    # The kernel adds into acc, so every benchmarking run of the autotuner must start from
    # the caller's values: restore_value puts acc back after each trial. Whether TMA can read
    # x changes the best tile, so it is part of the key.
    _cov_triangle_tuned = autotune(
        _cov_triangle_kernel,
        configs=_cov_configs(),
        key=["D", "TMA_OK"],
        prune_configs_by={"early_config_prune": _cov_prune},
        restore_value=["acc_ptr"],
    )


def _check(acc: torch.Tensor, x: torch.Tensor) -> int:
    if acc.dim() != 2 or acc.shape[0] != acc.shape[1]:
        raise ValueError(f"acc must be a square (d, d) matrix, got shape {tuple(acc.shape)}")
    if acc.dtype not in ACC_DTYPES:
        raise TypeError(f"acc must be float32 or float64, got {acc.dtype}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    d = acc.shape[0]
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"x must have shape (..., {d}) to match acc, got {tuple(x.shape)}")
    if x.device != acc.device:
        raise ValueError(f"x is on {x.device} but acc is on {acc.device}")
    if _overlaps_itself(acc):
        # The kernel would race on the shared cells; torch's in-place ops refuse such a tensor too.
        raise ValueError(
            f"acc's entries share memory (strides {acc.stride()}, e.g. an expand()ed tensor): pass one with "
            "its own storage per entry, such as acc.contiguous()"
        )
    return d


def _overlaps_itself(t: torch.Tensor) -> bool:
    probe = getattr(torch, "_debug_has_internal_overlap", None)
    if probe is not None and not torch.compiler.is_compiling():  # Dynamo cannot trace the probe
        return probe(t) == 1  # 1: certainly overlapping, the case torch's own writes reject
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


class KeptRows:
    """A row mask prepared once for several updates over the same rows.

    ``covariance_update`` takes it wherever it takes a mask. The Triton kernel reads
    kept rows through a list of their numbers (dropped rows cost neither loads nor
    flops, and the kernel's loop has no data-dependent branch to stall its pipelining);
    building that list takes a few small launches, which a collector that updates
    many accumulators per batch would otherwise repeat for each. No host sync:
    the number of kept rows stays on the device. The list is built on first use
    and then kept: build a new KeptRows if the mask changes in place. Pass it on
    x's device; on another one the mask is moved and the list rebuilt per call.
    """

    def __init__(self, mask: torch.Tensor):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"KeptRows takes a bool or 0/1 tensor over x's leading dims, got {type(mask).__name__}")
        self.mask = mask.reshape(-1) != 0 if mask.dtype != torch.bool else mask.reshape(-1)
        self.shape = mask.shape  # the layout it was given in, checked against x's leading dims
        self._index = None

    def index_and_count(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, count): int32 (rows + 1,) whose first ``count`` entries are the kept rows in
        order (the last slot collects the dropped ones), and int32 (1,) ``count``."""
        if self._index is None:
            keep, rows = self.mask, self.mask.numel()
            pos = torch.cumsum(keep.to(torch.int32), 0, dtype=torch.int32)
            count = pos[-1:].clone() if rows else torch.zeros(1, dtype=torch.int32, device=keep.device)
            dest = torch.where(keep, pos - 1, rows).to(torch.int64)
            index = torch.empty(rows + 1, dtype=torch.int32, device=keep.device)
            index.scatter_(0, dest, torch.arange(rows, dtype=torch.int32, device=keep.device))
            self._index = (index, count)
        return self._index


def _check_mask_shape(shape: torch.Size, lead: torch.Size, what: str) -> None:
    """A mask describes x's rows in x's row order: shaped as x's leading dims, or either of them flat.
    Another shape of the same size, such as (seq, batch) for a (batch, seq, d) x, would silently drop
    the wrong rows."""
    if shape.numel() == lead.numel() and (shape == lead or len(shape) == 1 or len(lead) == 1):
        return
    raise ValueError(
        f"{what} has shape {tuple(shape)} but x's leading dims are {tuple(lead)}: give a mask of that shape, "
        f"or a flat one of {lead.numel()} entries"
    )


def row_weights(x: torch.Tensor, mask: torch.Tensor | None, scale: torch.Tensor | None):
    """Flatten ``mask`` and ``scale`` to per-row vectors over x's leading dims.

    ``scale`` may cover fewer leading dims than x (one weight per sequence):
    it is broadcast over the trailing ones; a 1-D scale of one entry per row is taken flat. Returns (keep: bool | None, scale: float | None),
    each of shape (rows,).
    """
    lead = x.shape[:-1]
    keep = None
    if isinstance(mask, KeptRows):
        _check_mask_shape(mask.shape, lead, "KeptRows' mask")
        if mask.mask.device == x.device:
            keep = mask.mask
        else:
            mask = mask.mask
    if mask is not None and keep is None:
        _check_mask_shape(mask.shape, lead, "mask")
        keep = mask.reshape(-1).to(device=x.device) != 0
    s = None
    if scale is not None:
        scale = torch.as_tensor(scale, device=x.device)
        given = tuple(scale.shape)
        if scale.dim() == 1 and scale.numel() == lead.numel():
            return keep, scale  # one weight per row, flat, as a flat mask is taken
        while scale.dim() < len(lead):
            scale = scale.unsqueeze(-1)
        try:
            s = scale.expand(lead).reshape(-1)
        except RuntimeError as e:
            raise ValueError(
                f"scale of shape {given} fits neither x's leading dims {tuple(lead)} (broadcast from the "
                f"left: one weight per sequence) nor a flat list of its {lead.numel()} rows"
            ) from e
    return keep, s


def covariance_update_torch(
    acc: torch.Tensor, x: torch.Tensor, mask=None, scale=None, *, leaf: int | None = None, band: int | None = None
):
    """Reference update with the same triangle contract as the kernel.

    On the CPU, dropped rows are gathered out first, so padding costs no flops
    (a CPU mask needs no device sync to be read). Elsewhere they are zeroed
    with ``where`` (not multiplied, so a NaN in a padding position cannot leak)
    and no host synchronization happens. ``leaf`` overrides TORCH_LEAF of the
    recursive triangle; ``band`` switches to fixed row bands of that width.
    """
    d = acc.shape[0]
    keep, s = row_weights(x, mask, scale)
    xf = x.reshape(x.shape[:-1].numel(), d)
    if keep is not None and keep.device.type == "cpu":
        idx = keep.nonzero().squeeze(1)
        if idx.numel() < keep.numel():
            xf = xf.index_select(0, idx)
            s = None if s is None else s.index_select(0, idx)
        keep = None
    xf = xf.to(acc.dtype)
    if s is not None:
        xf = xf * s.to(acc.dtype).unsqueeze(1)
    if keep is not None:
        xf = torch.where(keep.unsqueeze(1), xf, xf.new_zeros(()))
    if band is not None:
        _triangle_bands(acc, xf, band)
    else:
        _triangle_recursive(acc, xf, 0, d, TORCH_LEAF if leaf is None else leaf)
    return acc


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as a (B, T, d) tensor sharing x's storage whenever the leading dims allow it."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    return x.flatten(0, -3)  # a view when the outer dims merge, else the one copy we cannot avoid


def covariance_update_triton(acc: torch.Tensor, x: torch.Tensor, mask=None, scale=None):
    """Launch the upper-triangle tile kernel; same contract as :func:`covariance_update_torch`."""
    keep, s = row_weights(x, mask, scale)
    x3 = _rows_view(x)
    if keep is not None:
        kept = mask if isinstance(mask, KeptRows) and mask.mask is keep else KeptRows(keep)
        idx, count = kept.index_and_count()
    else:
        idx = count = None
    scale32 = s.to(device=x.device, dtype=torch.float32).contiguous() if s is not None else None
    if torch.compiler.is_compiling():
        _cov_triangle_op(acc, x3, idx, count, scale32)
    else:
        _cov_triangle_launch(acc, x3, idx, count, scale32)
    return acc


def _tma_size_ok(rows: int, d: int) -> bool:
    """Whether an update of ``rows`` rows of width ``d`` is one the TMA configs may run: tuned at
    all, and at least TMA_MIN_MACS, unless CORDA_KERNELS_TMA=1 lifts that line."""
    return d > SMALL_D and (rows * d * d >= TMA_MIN_MACS or tma_requested())


def _cov_triangle_launch(acc, x3, idx, count, scale32) -> None:
    """acc[upper tiles] += Σ over x3's rows (the first count[0] of idx when given) of (s·x)(s·x)ᵀ."""
    d = acc.shape[0]
    nb_, nt, _ = x3.shape
    rows = nb_ * nt
    if rows == 0 or d == 0:
        return
    sb, st, sd = x3.stride()  # read here: under torch.compile the tensor that arrives may be laid out anew
    if nt == 1:
        st = sb  # one row per sequence: rows are spaced by the outer stride
    # Rows are evenly spaced when there is one sequence or sequences sit back to back:
    # then the kernel skips the per-row divmod.
    three_d = nb_ > 1 and nt > 1 and sb != nt * st
    # fp32 x is summed in true fp32 unless the caller opted into TF32 for matmuls (torch's own switch);
    # 16-bit operands ignore the setting.
    precision = "tf32" if x3.dtype != torch.float32 or (x3.is_cuda and tf32_matmul()) else "ieee"

    xa_desc = xb_desc = None
    plain = idx is None and scale32 is None and not three_d
    if plain and _tma_size_ok(rows, d) and tma_device(x3):
        rows2 = x3.as_strided((rows, d), (st, sd))  # evenly spaced rows as one (rows, d) matrix
        if tma_rows(rows2):
            desc = tensor_descriptor_class()
            xa_desc, xb_desc = desc.from_tensor(rows2, [16, 16]), desc.from_tensor(rows2, [16, 16])

    def grid(meta):
        nb = triton.cdiv(d, meta["BLOCK_D"] * meta["WIDE"])
        return (meta["WIDE"] * (nb * (nb + 1) // 2),)

    with on_device(x3):
        _cov_triangle_tuned[grid](
            acc,
            x3,
            xa_desc,
            xb_desc,
            idx if idx is not None else x3,  # never read without HAS_INDEX
            count if count is not None else x3,
            scale32 if scale32 is not None else x3,
            rows,
            nt,
            d,
            sb,
            st,
            sd,
            acc.stride(0),
            acc.stride(1),
            int(xa_desc is not None),
            HAS_INDEX=idx is not None,
            HAS_SCALE=scale32 is not None,
            THREE_D=three_d,
            INPUT_PRECISION=precision,
        )


# torch.compile (collect_cov over a compiled model traces the hooks): Dynamo would trace the
# Triton launch itself and fails on it (lora.py says how); as a custom op that mutates acc the
# launch is opaque to it. Eager calls launch directly, without the dispatcher.
_cov_triangle_op = torch.library.custom_op(
    "corda_kernels::cov_triangle",
    mutates_args=("acc",),
    schema="(Tensor(a!) acc, Tensor x3, Tensor? idx, Tensor? count, Tensor? scale) -> ()",
)(_cov_triangle_launch)


@_cov_triangle_op.register_fake
def _(acc, x3, idx, count, scale):
    return None


def covariance_update(
    acc: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | KeptRows | None = None,
    *,
    scale: torch.Tensor | float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """In place: add Σ over kept rows of scale²·xxᵀ to the upper triangle of ``acc``.

    ``x`` is (..., d) in fp32/fp16/bf16 (fp64 on the torch path) with any strides; ``mask`` (bool or 0/1
    over x's leading dims, or a :class:`KeptRows` built once for several updates) drops rows;
    ``scale`` is a weight applied to x's rows: shaped as leading dims of x, broadcast from the left
    (one per sequence), or flat with one entry per row (fp16 x with a scale stays on the torch path
    under "auto": the kernel's fp16 rounding of s·x could overflow). ``acc``'s entries must not share
    memory.
    Read the full matrix with :func:`covariance_result`. Returns ``acc``.
    """
    _check(acc, x)
    # fp16 with a scale: the kernel rounds s·x back to fp16, which overflows past 65504 (normalize="peft"
    # on a sequence whose |min| dwarfs its signed max). "auto" keeps that case on the fp32 torch path.
    fp16_scaled = x.dtype == torch.float16 and scale is not None
    which = resolve(backend, acc, x, supported=x.dtype in TRITON_X_DTYPES and not fp16_scaled)
    if which == "triton" and x.dtype not in TRITON_X_DTYPES:
        raise TypeError(f"the Triton kernel takes float32, float16 or bfloat16 x, got {x.dtype}: use backend='torch'")
    # A statistic, not a differentiable op: an x that requires grad must not chain every update into
    # one autograd graph (keeping every x alive), on either path.
    with torch.no_grad():
        if which == "triton":
            return covariance_update_triton(acc, x, mask, scale)
        return covariance_update_torch(acc, x, mask, scale)


def covariance_result(acc: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Full symmetric (d, d) matrix from a triangle accumulator: a new tensor, or with
    ``inplace=True`` the accumulator itself, mirrored (no second d×d result at once: a
    collection finishing many layers would otherwise hold each matrix twice)."""
    if not inplace:
        upper = torch.triu(acc)
        return upper + torch.triu(acc, diagonal=1).T
    acc.triu_()  # below the diagonal, a diagonal tile's kernel leaves partial sums
    return acc.add_(torch.tril(acc.T, diagonal=-1))


def covariance_reference(x: torch.Tensor, mask=None, scale=None) -> torch.Tensor:
    """Float64 ground truth: Σ over kept rows of scale²·xxᵀ, plain and slow."""
    keep, s = row_weights(x, mask, scale)
    xf = x.reshape(x.shape[:-1].numel(), x.shape[-1]).double()
    if s is not None:
        xf = xf * s.double().unsqueeze(1)
    if keep is not None:
        xf = xf[keep]
    return xf.T @ xf
