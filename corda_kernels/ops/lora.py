"""Low-rank adapter linear: y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ.

W and b are the frozen residual; gradients flow to x, A and B (and to W/b only
if a caller unfreezes them). Neither path forms B@A or writes a separate
(M, N) adapter output: the torch path adds the rank-r update into y with one
``addmm_``; the Triton path adds it inside the GEMM's own accumulator.

This file holds, top to bottom: the Triton kernel, the launchers (torch
reference and Triton), and the small autograd Function that only saves tensors
and calls launchers.
"""

from __future__ import annotations

import functools

import torch
from packaging.version import Version

from ._backend import (
    autotune,
    autotune_enabled,
    interpreting,
    on_device,
    resolve,
    sm_count,
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

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # float64 takes the torch path


#: Autotune candidates of the fused GEMM on a GPU, as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
#: num_stages): Hopper first (large tiles, 8 warps for the 128×256 accumulator), then shapes
#: that suit Ampere's smaller shared memory and small M or N. Under the interpreter one
#: small config runs instead; tests/test_gpu_tiles.py runs each of these there.
GEMM_GPU_TILES = (
    (128, 256, 64, 8, 3),
    # An H200 picked the largest tile (2026-11-29); one more stage for it fits Hopper's shared
    # memory up to rank tiles of 32 only: the autotuner skips it above.
    (128, 256, 64, 8, 4),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 3),
)
#: Autotune candidates of the fused GEMM that read x and W through TMA descriptors (Hopper and
#: newer, 16-bit operands whose rows sit on 16-byte boundaries), as (BLOCK_M, BLOCK_N, BLOCK_K,
#: num_warps, num_stages, persistent). For the forward GEMM they join GEMM_GPU_TILES in one
#: autotuner unless CORDA_KERNELS_TMA=0, so each shape runs whichever loads measure faster; for
#: dx's GEMM only with CORDA_KERNELS_TMA=1 (see _tma_descriptors). Persistent ones launch
#: one program per SM, each walking several tiles. On the H200 (2026-11-30) they took the
#: 8192×4096×4096 forward GEMM from 645 to 728-743 TFLOP/s (cuBLAS: 796). tests/aot_compile.py
#: checks which fit shared memory and that their loads compile to TMA copies.
GEMM_TMA_TILES = (
    (128, 256, 64, 8, 3, 0),
    (128, 256, 64, 8, 4, 0),
    (128, 128, 64, 8, 4, 0),
    (128, 128, 64, 4, 4, 0),
    (128, 256, 64, 8, 3, 1),
    (128, 128, 64, 8, 4, 1),
)
#: GEMMs of at most this many multiply-adds (M·N·K) run one small pointer config, untuned:
#: tuning them costs more than it wins, and no TMA descriptors are built for them.
SMALL_GEMM = 1 << 24
#: Autotune candidates of the dy kernel, as (BLOCK_M, BLOCK_N, num_warps, num_stages). With s
#: in dy's dtype and the rank tile at most 64 (DY_RANK_LIMIT), tests/aot_compile.py checks
#: which fit shared memory when compiled as the runtime does (aligned, pipelined); the
#: autotuner skips any that do not fit a given GPU.
DY_GPU_TILES = ((64, 128, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4), (32, 128, 4, 3))


# ----------------------------------------------------------------------------- Triton kernel
# One kernel serves the forward and the input gradient, which have the same shape:
#
#     out = X·Wt + bias + keep ⊙ (alpha·L)·Rt        X (M, K), Wt (K, N), L (M, r), Rt (r, N)
#
#   forward:  X = x,  Wt = Wᵀ, L = s = xd·Aᵀ,      Rt = Bᵀ, alpha = scaling
#   backward: X = dy, Wt = W,  L = dy·B,           Rt = A,  alpha = scaling, keep = dropout mask/(1-p)
#
# Tiling. Each program owns one BLOCK_M×BLOCK_N tile of out and runs the usual
# K loop for X·Wt into an fp32 accumulator. The adapter term is a product with
# inner dimension r, so it is nothing but a few more iterations of that same
# loop, over rank chunks of BLOCK_RANK (r padded to at least 16, the smallest
# tensor-core K), reading a (BLOCK_M, r) slice of L and an (r, BLOCK_N) slice
# of Rt: the rank-r update costs 2·M·N·r flops and no extra pass over the output,
# which is written once. L is the only thing computed outside the kernel; it is
# (M, r), tiny, kept in fp32 and rounded to X's dtype right before its dot,
# after alpha is applied, so tensor cores take it at one rounding. Programs are
# ordered in groups of GROUP_M row-tiles so neighbours reuse the same Wt panel
# from L2. With dropout, keep ⊙ (·) cannot be folded into a shared accumulator,
# so the adapter term gets its own and is masked once in the epilogue.
#
# Two ways to load X and Wt share the epilogue, chosen per config (USE_TMA): pointer
# loads, which take any strides and any GPU, and TMA descriptors (Hopper on), which
# need 16-bit operands with a unit inner stride and 16-byte aligned rows. Wt is read
# through a descriptor over whichever of Wt or its transpose (W itself, in forward)
# is row-major (W_DESC_NK).
if triton is not None:

    @triton.jit
    def _lowrank_dot(
        acc,
        l_ptr,
        r_ptr,
        offs_m,
        offs_n,
        M,
        N,
        RANK,
        alpha,
        stride_lm,
        stride_lr,
        stride_rr,
        stride_rn,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_RANK: tl.constexpr,
    ):
        dt = r_ptr.dtype.element_ty
        in_m = offs_m < M
        in_n = offs_n < N
        for r0 in range(0, RANK, BLOCK_RANK):
            rr = r0 + tl.arange(0, BLOCK_RANK)
            in_r = rr < RANK
            lo = tl.load(
                l_ptr + offs_m[:, None].to(tl.int64) * stride_lm + rr[None, :] * stride_lr,
                mask=in_m[:, None] & in_r[None, :],
                other=0.0,
            )
            ro = tl.load(
                r_ptr + rr[:, None] * stride_rr + offs_n[None, :].to(tl.int64) * stride_rn,
                mask=in_r[:, None] & in_n[None, :],
                other=0.0,
            )
            acc = tl.dot((lo * alpha).to(dt), ro, acc, input_precision=INPUT_PRECISION)
        return acc

    @triton.jit
    def _tile_of(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Tiles in groups of GROUP_M row-tiles, so neighbours reuse the same Wt panel from L2.
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_rows
        pid_n = (tile % per_group) // group_rows
        return pid_m, pid_n

    @triton.jit
    def _epilogue(
        acc, out_ptr, bias_ptr, l_ptr, r_ptr, keep_ptr, offs_m, offs_n, M, N, RANK, alpha, keep_scale,
        stride_om, stride_on, stride_lm, stride_lr, stride_rr, stride_rn, stride_km, stride_kn,
        HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_RANK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        in_m = offs_m < M
        in_n = offs_n < N
        # With a dropout mask the rank-r term needs its own accumulator, masked in the epilogue;
        # without one it runs on in the GEMM's.
        if HAS_KEEP:
            low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            low = acc
        low = _lowrank_dot(
            low, l_ptr, r_ptr, offs_m, offs_n, M, N, RANK, alpha,
            stride_lm, stride_lr, stride_rr, stride_rn, INPUT_PRECISION, BLOCK_RANK,
        )  # fmt: skip
        if HAS_KEEP:
            keep = tl.load(
                keep_ptr + offs_m[:, None].to(tl.int64) * stride_km + offs_n[None, :] * stride_kn,
                mask=in_m[:, None] & in_n[None, :],
                other=0,
            )
            acc += tl.where(keep != 0, low * keep_scale, 0.0)
        else:
            acc = low
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])

    @triton.jit
    def _gemm_lowrank_kernel(
        out_ptr,
        x_ptr,
        w_ptr,
        x_desc,
        w_desc,
        bias_ptr,
        l_ptr,
        r_ptr,
        keep_ptr,
        M,
        N,
        K,
        RANK,
        alpha,
        keep_scale,
        stride_om,
        stride_on,
        stride_xm,
        stride_xk,
        stride_wk,
        stride_wn,
        stride_lm,
        stride_lr,
        stride_rr,
        stride_rn,
        stride_km,
        stride_kn,
        M_BUCKET,  # autotuning key only: M rounded up to a power of two
        TMA_OK,  # autotuning key only: 1 when x_desc and w_desc are given
        HAS_BIAS: tl.constexpr,
        HAS_KEEP: tl.constexpr,
        W_DESC_NK: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_RANK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        USE_TMA: tl.constexpr,
        PERSISTENT: tl.constexpr,  # read by the launcher's grid only
    ):
        if USE_TMA:
            # Operand tiles arrive through the copy engine (TMA): no address arithmetic or masks in
            # the K loop (the engine zero-fills past the edges), which pointer loads pay for in
            # registers. A program may own several tiles (the launcher caps the grid for the
            # persistent configs), walked in the grouped order.
            num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
            for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
                pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
                off_m = pid_m * BLOCK_M
                off_n = pid_n * BLOCK_N
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    a = x_desc.load([off_m, k0])
                    if W_DESC_NK:  # the descriptor is over W (N, K): Wt's tile is its transpose
                        b = w_desc.load([off_n, k0]).T
                    else:
                        b = w_desc.load([k0, off_n])
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                _epilogue(
                    acc, out_ptr, bias_ptr, l_ptr, r_ptr, keep_ptr,
                    off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N), M, N, RANK, alpha, keep_scale,
                    stride_om, stride_on, stride_lm, stride_lr, stride_rr, stride_rn, stride_km, stride_kn,
                    HAS_BIAS, HAS_KEEP, INPUT_PRECISION, BLOCK_RANK, BLOCK_M, BLOCK_N,
                )  # fmt: skip
        else:
            pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            in_m = offs_m < M
            in_n = offs_n < N
            x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
            w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                in_k = kk < K
                kk64 = kk.to(tl.int64)  # a transposed operand's K stride can be M or N: keep products in 64 bits
                a = tl.load(x_rows + kk64[None, :] * stride_xk, mask=in_m[:, None] & in_k[None, :], other=0.0)
                b = tl.load(w_cols + kk64[:, None] * stride_wk, mask=in_k[:, None] & in_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            _epilogue(
                acc, out_ptr, bias_ptr, l_ptr, r_ptr, keep_ptr, offs_m, offs_n, M, N, RANK, alpha, keep_scale,
                stride_om, stride_on, stride_lm, stride_lr, stride_rr, stride_rn, stride_km, stride_kn,
                HAS_BIAS, HAS_KEEP, INPUT_PRECISION, BLOCK_RANK, BLOCK_M, BLOCK_N,
            )  # fmt: skip

    def _tma_blocks(nargs):
        # Autotune pre-hook of the TMA configs: a descriptor carries its tile shape, which is the config's.
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["x_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bn, bk] if nargs["W_DESC_NK"] else [bk, bn]

    def _gemm_config(bm, bn, bk, w, s, tma=False, persistent=False):
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "USE_TMA": tma, "PERSISTENT": persistent}
        return triton.Config(tiles, num_warps=w, num_stages=s, pre_hook=_tma_blocks if tma else None)

    def _gemm_configs():
        if interpreting():
            # The interpreter runs every program in numpy: one mid-sized config, no autotuning.
            return [_gemm_config(32, 32, 32, 4, 1)]
        pointer = [_gemm_config(*t) for t in GEMM_GPU_TILES]
        tma = [_gemm_config(*t[:5], tma=True, persistent=bool(t[5])) for t in GEMM_TMA_TILES]
        # Without autotuning only the smallest pointer config remains: it runs on any GPU and layout.
        return tuning_configs(pointer) + (tma if autotune_enabled() else [])

    def _gemm_prune(configs, named_args, **kwargs):
        # The TMA configs need descriptors, which the launcher gives only where they work.
        if not named_args["TMA_OK"]:
            configs = [c for c in configs if not c.kwargs["USE_TMA"]]
        # Tiles larger than the problem only add masked work; tiny problems get one config.
        m, n, k = named_args["M"], named_args["N"], named_args["K"]
        if len(configs) == 1:
            return configs
        if m * n * k <= SMALL_GEMM:
            return [c for c in configs if c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_N"] == 64][:1] or configs[:1]
        return configs

    # Each trial writes out from scratch, so autotuning needs no restore. The rank tile, the
    # epilogue, W's layout (forward reads Wᵀ, the input gradient W) and whether TMA can read
    # the operands change the best tile, so they are part of the key: one shape's forward, dx
    # and every rank tune separately.
    _gemm_lowrank_tuned = autotune(
        _gemm_lowrank_kernel,
        configs=_gemm_configs(),
        key=["M_BUCKET", "N", "K", "BLOCK_RANK", "HAS_BIAS", "HAS_KEEP", "stride_wk", "TMA_OK"],
        prune_configs_by={"early_config_prune": _gemm_prune},
    )


# The rank-sized gradients of backward, from one read of dy:
#
#     u  = dy·B      (M, r)   reduced over N
#     dB = dyᵀ·s     (N, r)   reduced over M      (both still to be scaled by `scaling`)
#
# Each program owns one BLOCK_N column strip of dy and a contiguous chunk of its
# row blocks. Per (BLOCK_M, BLOCK_N) tile of dy it does two small dots: tile·B
# (added into u with atomics, since u sums over every column strip) and
# tileᵀ·s (kept in registers across the chunk, then added into dB with one
# atomic per element). dy is therefore read exactly once, from DRAM; the
# atomics land in L2 (u is M·r fp32, a few MB) and number M·r·cdiv(N, BLOCK_N)
# + N·r·chunks, i.e. r/BLOCK_N of dy's element count for u. That ratio is why
# backward uses this kernel only up to MAX_FUSED_RANK and two GEMMs above it.
# The sums are fp32 and their order varies between runs, as in any split-K GEMM.
if triton is not None:

    @triton.jit
    def _dy_lowrank_kernel(
        dy_ptr,
        b_ptr,
        s_ptr,
        u_ptr,
        db_ptr,
        M,
        N,
        RANK,
        stride_dym,
        stride_dyn,
        stride_bn,
        stride_br,
        stride_sm,
        stride_sr,
        stride_um,
        stride_ur,
        stride_dbn,
        stride_dbr,
        M_BUCKET,  # autotuning key only: M rounded up to a power of two
        NEED_U: tl.constexpr,
        NEED_DB: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_RANK: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_c = tl.program_id(1)
        dt = dy_ptr.dtype.element_ty
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_n = offs_n < N
        rr = tl.arange(0, BLOCK_RANK)
        in_r = rr < RANK
        if NEED_U:
            bt = tl.load(
                b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + rr[None, :] * stride_br,
                mask=in_n[:, None] & in_r[None, :],
                other=0.0,
            ).to(dt)
        else:
            bt = tl.zeros((BLOCK_N, BLOCK_RANK), dtype=dt)
        db_acc = tl.zeros((BLOCK_N, BLOCK_RANK), dtype=tl.float32)
        # Row chunks: grid axis 1 splits the cdiv(M, BLOCK_M) row blocks as evenly as it can.
        per_chunk = tl.cdiv(tl.cdiv(M, BLOCK_M), tl.num_programs(1)) * BLOCK_M
        m_start = pid_c * per_chunk
        m_end = tl.minimum(m_start + per_chunk, M)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_m = offs_m < m_end
            rows = offs_m[:, None].to(tl.int64)
            tile = tl.load(
                dy_ptr + rows * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn,
                mask=in_m[:, None] & in_n[None, :],
                other=0.0,
            )
            if NEED_U:
                part = tl.dot(tile, bt, input_precision=INPUT_PRECISION)
                tl.atomic_add(
                    u_ptr + rows * stride_um + rr[None, :] * stride_ur,
                    part,
                    mask=in_m[:, None] & in_r[None, :],
                    sem="relaxed",
                )
            if NEED_DB:
                sv = tl.load(
                    s_ptr + rows * stride_sm + rr[None, :] * stride_sr,
                    mask=in_m[:, None] & in_r[None, :],
                    other=0.0,
                )
                db_acc = tl.dot(tl.trans(tile), sv.to(dt), db_acc, input_precision=INPUT_PRECISION)
        if NEED_DB:
            tl.atomic_add(
                db_ptr + offs_n[:, None].to(tl.int64) * stride_dbn + rr[None, :] * stride_dbr,
                db_acc,
                mask=in_n[:, None] & in_r[None, :],
                sem="relaxed",
            )

    def _dy_configs():
        if interpreting():
            return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
        return tuning_configs(
            [
                triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm, bn, w, st in DY_GPU_TILES
            ]
        )

    # Trials accumulate into u and dB with atomics: reset_to_zero gives every trial a clean start.
    _dy_lowrank_tuned = autotune(
        _dy_lowrank_kernel,
        configs=_dy_configs(),
        key=["M_BUCKET", "N", "BLOCK_RANK"],
        reset_to_zero=["u_ptr", "db_ptr"],
    )


# ----------------------------------------------------------------------------- torch launchers
def _wide(t: torch.Tensor) -> torch.dtype:
    """Dtype for the rank-sized intermediates: fp32, or fp64 for fp64 operands (never narrower than t)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def lora_forward_torch(x2, weight, bias, A, B, scaling, xd2):
    """x2: (M, K) input, xd2: the dropped-out input feeding A (x2 itself when p=0)."""
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    s = (xd2 @ A.t()).to(_wide(x2))  # (M, r): tiny, kept wide for backward
    if torch.compiler.is_compiling():
        # Out of place: torch 2.11's Dynamo sends the gradient of a Function output that forward
        # modified in place to the wrong slot, and every gradient comes out zero (pytorch#180642).
        # Compiled code plans its own buffers, so the in-place form saves nothing there.
        return torch.addmm(y, s.to(y.dtype), B.t(), alpha=scaling), s
    y.addmm_(s.to(y.dtype), B.t(), alpha=scaling)
    return y, s


def _scaled(t: torch.Tensor, scaling: float) -> torch.Tensor:
    # In place, and skipped at the default scaling 1 (alpha = rank): one kernel launch fewer per call.
    return t.mul_(scaling) if scaling != 1.0 else t


def lora_backward_torch(dy2, x2, xd2, keep, p, s, weight, A, B, scaling, needs):
    """Returns (dx, dW, db, dA, dB); entries not asked for by ``needs`` are None."""
    need_x, need_w, need_b, need_a, need_bb = needs
    ds = _scaled(_mm_wide(dy2, B), scaling) if need_x or need_a else None  # (M, r)
    dx = dW = db = dA = dB = None
    if need_x:
        dx = dy2 @ weight
        if keep is None:
            dx.addmm_(ds.to(dx.dtype), A)
        else:
            # The 1/(1-p) goes into the mask, not into add_(alpha=): inductor (torch 2.13) drops the
            # alpha of a matmul's add and the input gradient came out too small.
            dx.add_((ds.to(dx.dtype) @ A) * (keep.to(dx.dtype) * (1.0 / (1.0 - p))))
    if need_a:
        dA = _mm_wide(ds.to(xd2.dtype).t(), xd2).to(A.dtype)
    if need_bb:
        dB = _scaled(_mm_wide(dy2.t(), s.to(dy2.dtype)), scaling).to(B.dtype)
    if need_w:
        dW = dy2.t() @ x2
    if need_b:
        db = dy2.sum(0)
    return dx, dW, db, dA, dB


def lora_backward_graph(dy2, x2, xd2, p, weight, A, B, scaling, needs):
    """The backward in plain differentiable ops, for ``create_graph=True``: (dx, dW, db, dA, dB).

    The fused backward reads s = xd·Aᵀ as forward saved it, detached, so a second derivative through
    it would silently miss the terms through x and A: here s is formed again from the saved inputs.
    Those are the autograd inputs themselves only without dropout (x2 is then xd2), and s needs xd2,
    which forward keeps when lora_A takes a gradient.
    """
    need_x, need_w, need_b, need_a, need_bb = needs
    if p > 0.0:
        raise RuntimeError(
            "lora_linear: second derivatives (create_graph=True) are not supported with dropout_p > 0; "
            "set the adapter's dropout to 0 for this step"
        )
    if need_bb and xd2 is None:
        raise RuntimeError(
            "lora_linear: second derivatives (create_graph=True) need lora_A to take a gradient whenever "
            "lora_B does: with lora_A frozen, forward did not keep the input they read"
        )
    u = dy2 @ B
    dx = dy2 @ weight + scaling * (u @ A) if need_x else None
    dW = dy2.t() @ x2 if need_w else None
    db = dy2.sum(0) if need_b else None
    dA = scaling * (u.t() @ xd2) if need_a else None
    dB = scaling * (dy2.t() @ (xd2 @ A.t())) if need_bb else None
    return dx, dW, db, dA, dB


def _mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in _wide(a): 16-bit operands multiply on the tensor cores with fp32 output.

    Upcasting the (M, K) operand instead cost an H200 a full fp32 copy of x and of dy and two
    fp32 GEMMs per backward (the torch path then took 1.76x the base linear's time). Rank-sized
    16-bit operands are rounded once, as in the Triton path.
    """
    if a.dtype in (torch.float16, torch.bfloat16):
        return _mm_f32(a, b.to(a.dtype))
    return a @ b.to(a.dtype)


# ----------------------------------------------------------------------------- Triton launchers
# torch.mm(..., out_dtype=) exists from torch 2.8. Decided up front: under torch.compile a failing
# call cannot be caught and retried, only eager falls back (and remembers it) if a build lacks it.
_MM_OUT_DTYPE = Version(torch.__version__).release >= (2, 8)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b as fp32 without an fp32 copy of a 16-bit operand where torch allows it."""
    global _MM_OUT_DTYPE
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    # device.type, not is_cuda: torch 2.6's Dynamo refuses the is_cuda attribute inside a Function.
    if a.device.type == "cuda":
        if _MM_OUT_DTYPE:
            if torch.compiler.is_compiling():
                return torch.mm(a, b, out_dtype=torch.float32)
            try:
                return torch.mm(a, b, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE = False
        return torch.mm(a, b).float()  # fp32 accumulation inside, one rounding of the result
    return torch.mm(a.float(), b.float())  # CPU (the interpreter): operands are small there


def _dot_precision(t: torch.Tensor) -> str:
    """fp32 operands follow torch's own matmul setting; 16-bit operands ignore it."""
    if t.dtype == torch.float32 and t.is_cuda and tf32_matmul():
        return "tf32"
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _on_first_device(fn):
    """Run a launcher under its first tensor's CUDA device: Triton launches on the current one."""

    @functools.wraps(fn)
    def run(t, *args, **kwargs):
        with on_device(t):
            return fn(t, *args, **kwargs)

    return run


@_on_first_device
def _gemm_lowrank(x, wt, bias, low, rt, alpha, keep=None, keep_scale=1.0):
    """out = x·wt + bias + keep ⊙ (alpha·low)·rt, written once. x (M, K), wt (K, N), low (M, r) fp32, rt (r, N)."""
    M, K = x.shape
    N = wt.shape[1]
    rank = low.shape[1]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    block_rank = min(64, max(16, triton.next_power_of_2(rank)))
    keep_arg = keep.view(torch.uint8) if keep is not None else x  # uint8: bool pointers vary across triton versions
    keep_strides = keep.stride() if keep is not None else (0, 0)
    x_desc, w_desc, w_nk = _tma_descriptors(x, wt)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, _persistent_programs(x)) if meta["PERSISTENT"] else tiles,)

    _gemm_lowrank_tuned[grid](
        out,
        x,
        wt,
        x_desc,
        w_desc,
        bias if bias is not None else x,
        low,
        rt,
        keep_arg,
        M,
        N,
        K,
        rank,
        float(alpha),
        float(keep_scale),
        out.stride(0),
        out.stride(1),
        x.stride(0),
        x.stride(1),
        wt.stride(0),
        wt.stride(1),
        low.stride(0),
        low.stride(1),
        rt.stride(0),
        rt.stride(1),
        keep_strides[0],
        keep_strides[1],
        triton.next_power_of_2(M),
        int(x_desc is not None),
        HAS_BIAS=bias is not None,
        HAS_KEEP=keep is not None,
        W_DESC_NK=w_nk,
        INPUT_PRECISION=_dot_precision(x),
        BLOCK_RANK=block_rank,
    )
    return out


def _tma_descriptors(x, wt):
    """(x_desc, w_desc, w_nk): descriptors for the TMA configs, or (None, None, False) where x or
    Wt cannot back one, or where no TMA config would run (a GEMM the autotuner leaves untuned).

    Their tile shapes are placeholders until a TMA config's pre-hook sets them. A pointer config
    timed after one during tuning sees the changed shape in its signature: one extra compile
    per tuning key, never a wrong result (the pointer branch does not read the descriptors)."""
    if not tma_device(x) or x.shape[0] * x.shape[1] * wt.shape[1] <= SMALL_GEMM:
        return None, None, False
    if wt.stride(0) == 1 and wt.stride(1) != 1:
        w_src, w_nk = wt.t(), True  # forward: Wt is a view of W (N, K), which is the row-major one
    elif not tma_requested():
        # dx's GEMM (W as it is) only when asked for: on the H200 it was timed through TMA only
        # inside fwd+bwd, with the forward's: 6% faster at r = 64, 28% slower at r = 16, while
        # the forward GEMM alone was 13-15% faster at both.
        return None, None, False
    else:
        w_src, w_nk = wt, False
    if not (tma_rows(x) and tma_rows(w_src) and x.dtype == w_src.dtype):
        return None, None, False
    desc = tensor_descriptor_class()
    return desc.from_tensor(x, [16, 16]), desc.from_tensor(w_src, [16, 16]), w_nk


def _persistent_programs(t: torch.Tensor) -> int:
    """Grid size of a persistent config: one program per SM (a few under the interpreter, so
    that each program walks several tiles there too)."""
    if t.is_cuda:
        return sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 3


#: Largest rank for which backward takes the fused dy kernel; above it, two torch GEMMs
#: over dy. Measured on an H200 (bench/RESULTS.md, 2026-11-29; M=8192, N=4096, bf16) the
#: two cuBLAS GEMMs took 0.067, 0.064 and 0.046 ms at r = 16, 64 and 128 against the
#: kernel's 0.138, 0.161 and 0.147 ms (run 1; 2-3x slower in run 2 as well): its L2
#: atomics for u cost more than the second read of dy saves. So the default path never
#: takes it; the kernel stays, tested, for GPUs and shapes where a measurement says
#: otherwise (at most DY_RANK_LIMIT).
MAX_FUSED_RANK = 0
#: The largest rank DY_GPU_TILES are sized for (shared memory, tests/aot_compile.py).
DY_RANK_LIMIT = 64


@_on_first_device
def _dy_lowrank(dy, B, s, chunks: int | None = None):
    """(dy·B, dyᵀ·s) in fp32 from one read of dy; either factor may be None to skip its product.

    dy (M, N), B (N, r) and s (M, r) in dy's dtype (an fp32 s is rounded to it in the
    kernel). ``chunks`` fixes how many
    programs split the rows (default: enough to fill the GPU; tests force it).
    """
    M, N = dy.shape
    ref = B if B is not None else s
    rank = ref.shape[1]
    u = torch.zeros((M, rank), device=dy.device, dtype=torch.float32) if B is not None else None
    db = torch.zeros((N, rank), device=dy.device, dtype=torch.float32) if s is not None else None
    if M == 0 or N == 0:
        return u, db
    if chunks is None:
        target = (
            4 * sm_count(dy.device.index if dy.device.index is not None else torch.cuda.current_device())
            if dy.is_cuda
            else 2
        )
    else:
        target = None

    def grid(meta):
        n_tiles = triton.cdiv(N, meta["BLOCK_N"])
        m_blocks = triton.cdiv(M, meta["BLOCK_M"])
        want = chunks if target is None else triton.cdiv(target, n_tiles)
        return (n_tiles, max(1, min(m_blocks, want)))

    # The autotuner zeroes u_ptr and db_ptr before every trial (reset_to_zero), so an output
    # that is not asked for gets a scratch placeholder, never a caller's tensor.
    scratch = None if (u is not None and db is not None) else torch.zeros(1, device=dy.device, dtype=torch.float32)
    u_arg, db_arg = (u if u is not None else scratch), (db if db is not None else scratch)
    b_arg, s_arg = (B if B is not None else dy), (s if s is not None else dy)
    _dy_lowrank_tuned[grid](
        dy,
        b_arg,
        s_arg,
        u_arg,
        db_arg,
        M,
        N,
        rank,
        dy.stride(0),
        dy.stride(1),
        b_arg.stride(0) if B is not None else 0,
        b_arg.stride(1) if B is not None else 0,
        s_arg.stride(0) if s is not None else 0,
        s_arg.stride(1) if s is not None else 0,
        u_arg.stride(0) if u is not None else 0,
        u_arg.stride(1) if u is not None else 0,
        db_arg.stride(0) if db is not None else 0,
        db_arg.stride(1) if db is not None else 0,
        triton.next_power_of_2(M),
        NEED_U=B is not None,
        NEED_DB=s is not None,
        INPUT_PRECISION=_dot_precision(dy),
        BLOCK_RANK=max(16, triton.next_power_of_2(rank)),
    )
    return u, db


# ----------------------------------------------------------------------------- torch.compile
# Dynamo traces a user's Triton launch itself, and on torch 2.11 it stopped on these
# autotuners ("Can't construct an AttrSource without a valid base source", for the
# early_config_prune hook; seen on an H200), or under the interpreter ran into the
# interpreter's numpy. Registered as custom ops the launches are opaque to the compiler,
# which sees only their output shapes; eager calls skip the dispatcher and launch directly.
# The ops return fresh tensors only: a product not asked for comes back as a (0, r) tensor.
_gemm_lowrank_op = torch.library.custom_op(
    "corda_kernels::gemm_lowrank",
    mutates_args=(),
    schema="(Tensor x, Tensor wt, Tensor? bias, Tensor low, Tensor rt, float alpha, Tensor? keep, "
    "float keep_scale) -> Tensor",
)(_gemm_lowrank)


@_gemm_lowrank_op.register_fake
def _(x, wt, bias, low, rt, alpha, keep, keep_scale):
    return x.new_empty((x.shape[0], wt.shape[1]))


def _dy_lowrank_pair(dy, B, s):
    u, db = _dy_lowrank(dy, B, s)
    rank = (B if B is not None else s).shape[1]
    u = u if u is not None else dy.new_empty((0, rank), dtype=torch.float32)
    db = db if db is not None else dy.new_empty((0, rank), dtype=torch.float32)
    return u, db


_dy_lowrank_op = torch.library.custom_op(
    "corda_kernels::dy_lowrank", mutates_args=(), schema="(Tensor dy, Tensor? B, Tensor? s) -> (Tensor, Tensor)"
)(_dy_lowrank_pair)


@_dy_lowrank_op.register_fake
def _(dy, B, s):
    rank = (B if B is not None else s).shape[1]
    u = dy.new_empty((dy.shape[0] if B is not None else 0, rank), dtype=torch.float32)
    db = dy.new_empty((dy.shape[1] if s is not None else 0, rank), dtype=torch.float32)
    return u, db


def _gemm(x, wt, bias, low, rt, alpha, keep=None, keep_scale=1.0):
    """:func:`_gemm_lowrank`, through its custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return _gemm_lowrank_op(x, wt, bias, low, rt, float(alpha), keep, float(keep_scale))
    return _gemm_lowrank(x, wt, bias, low, rt, alpha, keep, keep_scale)


def _dy(dy, B, s):
    """:func:`_dy_lowrank`, through its custom op while torch.compile traces."""
    if not torch.compiler.is_compiling():
        return _dy_lowrank(dy, B, s)
    u, db = _dy_lowrank_op(dy, B, s)
    return (u if B is not None else None), (db if s is not None else None)


def lora_forward_triton(x2, weight, bias, A, B, scaling, xd2):
    """Same contract as :func:`lora_forward_torch`: returns y (M, N) and s = xd2·Aᵀ (M, r) in fp32."""
    s = _mm_f32(xd2, A.t())  # the adapter's only intermediate; small, and saved for backward
    y = _gemm(x2, weight.t(), bias, s, B.t(), scaling)
    return y, s


def lora_backward_triton(dy2, x2, xd2, keep, p, s, weight, A, B, scaling, needs):
    """Same contract as :func:`lora_backward_torch`.

    u = dy·B and dB = scaling·dyᵀ·s come from two torch GEMMs over dy, or from one read
    of dy (:func:`_dy_lowrank`) for r <= MAX_FUSED_RANK (0 by default: slower on an H200).
    dx comes from the fused GEMM kernel (dy·W plus the rank-r term, dropout mask in its
    epilogue), and dA = scaling·uᵀ·xd. For 16-bit inputs u and s are rounded to that dtype before
    their GEMMs (fp32 accumulation), like the torch path.
    """
    need_x, need_w, need_b, need_a, need_bb = needs
    dx = dW = db = dA = dB = None
    need_u = need_x or need_a
    u = db32 = None
    if 0 < B.shape[1] <= min(MAX_FUSED_RANK, DY_RANK_LIMIT) and (need_u or need_bb):
        # s rounded to dy's dtype first (as the torch GEMM fallback does): half the bytes to stream
        # and to stage in shared memory.
        u, db32 = _dy(dy2, B if need_u else None, s.to(dy2.dtype) if need_bb else None)
    else:
        u = _mm_f32(dy2, B) if need_u else None
        db32 = _mm_f32(dy2.t(), s.to(dy2.dtype)) if need_bb else None
    if need_x:
        keep_scale = 1.0 / (1.0 - p) if keep is not None else 1.0
        dx = _gemm(dy2, weight, None, u, A, scaling, keep, keep_scale)
    if need_a:
        dA = _mm_f32((u * scaling if scaling != 1.0 else u).to(xd2.dtype).t(), xd2).to(A.dtype)
    if need_bb:
        dB = _scaled(db32, scaling).to(B.dtype)
    if need_w:
        dW = dy2.t() @ x2
    if need_b:
        db = dy2.sum(0)
    return dx, dW, db, dA, dB


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` would run a linear layer in for ``x``'s device, or None when it is off."""
    dev = x.device.type
    try:
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None


# ----------------------------------------------------------------------------- autograd glue
class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, A, B, scaling, dropout_p, which):
        keep = None
        xd2 = x2
        if dropout_p > 0.0:
            keep = torch.rand_like(x2, dtype=torch.float32) >= dropout_p
            xd2 = x2 * keep.to(x2.dtype) / (1.0 - dropout_p)
        fwd = lora_forward_triton if which == "triton" else lora_forward_torch
        y2, s = fwd(x2, weight, bias, A, B, scaling, xd2)
        # Only what the asked-for gradients read: x for dW, the dropped-out x for dA, the mask for dx,
        # s for dB (weight, A and B are the parameters themselves, no copies).
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        ctx.save_for_backward(
            x2 if need_w else None,
            xd2 if need_a else None,
            keep if need_x else None,
            s if need_b else None,
            weight,
            A,
            B,
        )
        ctx.scaling, ctx.p, ctx.which = scaling, dropout_p, which
        return y2

    @staticmethod
    def backward(ctx, dy):
        x2, xd2, keep, s, weight, A, B = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, a Hessian-vector product): the gradients must
            # themselves be differentiable, which the fused launchers' outputs are not.
            grads = lora_backward_graph(dy, x2, xd2, ctx.p, weight, A, B, ctx.scaling, needs)
        else:
            # The Function's output is 2-D. contiguous() is a no-op on a contiguous dy; asking
            # is_contiguous() first would stop torch 2.6's Dynamo, which traces backward strictly.
            bwd = lora_backward_triton if ctx.which == "triton" else lora_backward_torch
            grads = bwd(dy.contiguous(), x2, xd2, keep, ctx.p, s, weight, A, B, ctx.scaling, needs)
        return (*grads, None, None, None)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x·Wᵀ + b + scaling·(dropout(x)·Aᵀ)·Bᵀ with a fused forward and backward.

    Shapes: x (..., K), weight (N, K), bias (N,) or None, lora_A (r, K), lora_B (N, r); one dtype
    for all, fp32/fp16/bf16 (fp64 runs on the torch path). Under ``torch.autocast`` the operands
    are cast to the autocast dtype first, as ``F.linear``'s are (gradients flow back through the casts).
    """
    amp = autocast_dtype(x)
    if amp is not None:
        cast = [
            t if t is None or t.dtype not in TRITON_DTYPES else t.to(amp) for t in (x, weight, bias, lora_A, lora_B)
        ]
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(*cast, scaling, dropout_p=dropout_p, backend=backend)
    if x.dim() < 1 or weight.dim() != 2 or lora_A.dim() != 2:
        raise ValueError(
            f"x must be (..., K), weight (N, K) and lora_A (r, K); got shapes {tuple(x.shape)}, "
            f"{tuple(weight.shape)} and {tuple(lora_A.shape)}"
        )
    K = x.shape[-1]
    N = weight.shape[0]
    r = lora_A.shape[0]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must be (N, {K}) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if lora_A.shape != (r, K) or lora_B.shape != (N, r):
        raise ValueError(
            f"lora_A must be (r, {K}) and lora_B ({N}, r); got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    named = [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)]
    if bias is not None:
        named.append(("bias", bias))
    for name, t in named:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name} is {t.dtype} but x is {x.dtype}: all operands must share one dtype (for fp32 adapters over a 16-bit base, run under torch.autocast)"
            )
        if t.device != x.device:  # the Triton launch would read another device's memory
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()  # the kernel reads it with unit stride
    tensors = (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())
    which = resolve(backend, *tensors, supported=x.dtype in TRITON_DTYPES)
    if which == "triton" and x.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton kernels take float32, float16 or bfloat16, got {x.dtype}: use backend='torch'")
    # The Function sees 2-D operands and returns a fresh tensor; the reshapes stay outside it, as
    # ordinary autograd views. A view returned from inside a Function may not be modified in place,
    # and models do that to linear outputs (Falcon's attention adds to them).
    y2 = LoraLinearFunction.apply(
        x.reshape(x.shape[:-1].numel(), K), weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), which
    )
    return y2.reshape(*x.shape[:-1], N)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, keep=None, dropout_p: float = 0.0):
    """Float64, unfused: the definition, for tests."""
    xd = x.double()
    y = xd @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    xa = xd if keep is None else xd * keep.double() / (1.0 - dropout_p)
    return y + scaling * (xa @ lora_A.double().t()) @ lora_B.double().t()
