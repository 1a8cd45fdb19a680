"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without one: PTX, cubin and shared-memory checks.

The interpreter proves the kernels' arithmetic on the CPU, but it accepts code
that the GPU compiler rejects (dot shapes, layouts, atomics) and it has no
notion of shared memory. This script runs Triton's real compiler ahead of time
for each autotune config, so CI catches those errors on a CPU-only machine.

    python tests/aot_compile.py [--all]     # exit status 1 on any failure

It must run in a process where TRITON_INTERPRET is unset (the kernels are
decorated at import); tests/test_aot_compile.py starts it that way.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from corda_kernels.ops import covariance as cov  # noqa: E402
from corda_kernels.ops import lora  # noqa: E402

#: Shared memory a block may use (bytes): A100 (sm_80) and H100/H200 (sm_90).
SMEM_LIMIT = {80: 166912, 90: 232448}
TRITON_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def signature(fn, pointers: dict[str, str], floats=()) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in pointers:
            sig[p.name] = "*" + pointers[p.name]
        elif p.name in floats:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


class Variant:
    """One specialization of a kernel as the runtime would compile it.

    ``unit``: integer arguments that are 1 for the usual contiguous operands (Triton turns an
    int argument equal to 1 into a constant). ``aligned``: every other pointer and integer is
    a multiple of 16, as for aligned tensors with d, rows and strides in multiples of 16; that
    is when Triton can pipeline loads (cp.async) and so when a config needs the most shared
    memory. ``pipelined``: both dot operands' tile loads must compile to asynchronous copies
    into shared memory (bf16 and fp16).
    """

    def __init__(self, name, fn, sig, const, configs, unit=(), aligned=True, pipelined=False, descriptors=None):
        self.name, self.fn, self.configs, self.pipelined, self.aligned = name, fn, configs, pipelined, aligned
        self.sig, self.const, self.attrs = dict(sig), dict(const), {}
        # descriptors: argument name -> (dtype, cfg -> block shape) for the TMA configs, or -> None
        # where the launcher never builds one for this specialization (no TMA configs then); the
        # other configs get None there, as the launcher passes it.
        self.descriptors = descriptors or {}
        self.tma = bool(self.descriptors) and all(self.descriptors.values())
        for n in self.descriptors:
            self.sig[n] = "constexpr"
            self.const[n] = None
        for n in unit:
            self.sig[n] = "constexpr"
            self.const[n] = 1
        if aligned:
            for i, p in enumerate(fn.params):
                if self.sig[p.name].startswith("*") or self.sig[p.name] == "i32":
                    self.attrs[(i,)] = [["tt.divisibility", 16]]

    @staticmethod
    def async_tile_loads(ttgir: str, dtype: str) -> int:
        """How many 2-D tile loads in the 16-bit operand dtype became async copies to shared memory."""
        elem = {"bf16": "bf16", "fp16": "f16"}[dtype]
        pat = re.compile(r"async_copy_global_to_local .*: tensor<\d+x\d+x!tt\.ptr<" + elem + r">")
        return sum(1 for line in ttgir.splitlines() if pat.search(line))

    @staticmethod
    def tma_loads_missing(ttgir: str, descriptors) -> list[str]:
        """The descriptor arguments that no asynchronous TMA copy reads from."""
        return [n for n in descriptors if f"async_tma_copy_global_to_local %{n}[" not in ttgir]

    @staticmethod
    def tma_config(cfg) -> bool:
        return bool(cfg.kwargs.get("USE_TMA"))

    def compile(self, cfg, target, descriptors_given=False):
        """``descriptors_given``: a pointer config launched while the launcher built descriptors
        (TMA on, the autotuner picked pointer loads): they arrive with their placeholder tile."""
        sig, const = dict(self.sig), {**self.const, **cfg.kwargs}
        if self.tma_config(cfg) or descriptors_given:
            for n, (dt, block) in self.descriptors.items():
                shape = block(cfg.kwargs) if self.tma_config(cfg) else (16, 16)
                sig[n] = "tensordesc<{}[{}]>".format(dt, ", ".join(str(b) for b in shape))
                del const[n]
        src = ASTSource(fn=self.fn, signature=sig, constexprs=const, attrs=self.attrs)
        return triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def kernels(dtype: str) -> list[Variant]:
    """The specializations that run: collect_cov's masked update, the unmasked one, the scaled 3-D
    one; the adapter GEMM as forward and as dx with dropout; the dy kernel at the widest rank tile
    backward gives it."""
    dt = TRITON_DTYPE[dtype]
    precision = "ieee" if dtype == "fp32" else "tf32"
    half = dtype != "fp32"
    cov_sig = signature(
        cov._cov_triangle_kernel,
        {"acc_ptr": "fp32", "x_ptr": dt, "idx_ptr": "i32", "count_ptr": "i32", "scale_ptr": "fp32"},
    )
    cov_cfgs = cov._cov_triangle_tuned.configs
    cov_unit = ("stride_xd", "stride_an")

    def cov_descriptors(tma):
        # What the launcher builds for unmasked, unscaled 16-bit rows (cov._tma_blocks sets the shapes).
        if not tma or dtype == "fp32":
            return {"xa_desc": None, "xb_desc": None}
        return {
            "xa_desc": (dt, lambda c: (c["BLOCK_R"], c["BLOCK_D"])),
            "xb_desc": (dt, lambda c: (c["BLOCK_R"], c["WIDE"] * c["BLOCK_D"])),
        }

    def cov_const(index, scale, three_d):
        return {"HAS_INDEX": index, "HAS_SCALE": scale, "THREE_D": three_d, "INPUT_PRECISION": precision}

    gemm_sig = signature(
        lora._gemm_lowrank_kernel,
        {"out_ptr": dt, "x_ptr": dt, "w_ptr": dt, "bias_ptr": dt, "l_ptr": "fp32", "r_ptr": dt, "keep_ptr": "u8"},
        floats=("alpha", "keep_scale"),
    )
    gemm_cfgs = lora._gemm_lowrank_tuned.configs

    def gemm_const(bias, keep, w_nk):
        return {"HAS_BIAS": bias, "HAS_KEEP": keep, "W_DESC_NK": w_nk, "INPUT_PRECISION": precision, "BLOCK_RANK": 64}

    def gemm_descriptors(w_nk):
        # What the launcher builds (lora._tma_descriptors) and the pre-hook shapes (lora._tma_blocks).
        if dtype == "fp32":
            return {"x_desc": None, "w_desc": None}
        x = (dt, lambda c: (c["BLOCK_M"], c["BLOCK_K"]))
        w = (dt, (lambda c: (c["BLOCK_N"], c["BLOCK_K"])) if w_nk else (lambda c: (c["BLOCK_K"], c["BLOCK_N"])))
        return {"x_desc": x, "w_desc": w}

    dy_sig = signature(
        lora._dy_lowrank_kernel,
        {"dy_ptr": dt, "b_ptr": dt, "s_ptr": dt, "u_ptr": "fp32", "db_ptr": "fp32"},
    )
    # backward may take the dy kernel up to DY_RANK_LIMIT: its rank tile is at most that, rounded up
    dy_rank = max(16, triton.next_power_of_2(lora.DY_RANK_LIMIT))
    dy_const = {"NEED_U": True, "NEED_DB": True, "INPUT_PRECISION": precision, "BLOCK_RANK": dy_rank}
    return [
        Variant("covariance triangle (masked)", cov._cov_triangle_kernel, cov_sig, cov_const(True, False, False),
                cov_cfgs, cov_unit, pipelined=half, descriptors=cov_descriptors(False)),
        Variant("covariance triangle (unmasked)", cov._cov_triangle_kernel, cov_sig, cov_const(False, False, False),
                cov_cfgs, cov_unit, pipelined=half, descriptors=cov_descriptors(True)),
        Variant("covariance triangle (scaled 3-D, odd sizes)", cov._cov_triangle_kernel, cov_sig,
                cov_const(True, True, True), cov_cfgs, cov_unit, aligned=False, descriptors=cov_descriptors(False)),
        # forward: x (M, K), wt = Wᵀ, l = s (M, r), rt = Bᵀ; dx: x = dy, wt = W, rt = A, keep (M, K)
        Variant("adapter GEMM (forward)", lora._gemm_lowrank_kernel, gemm_sig, gemm_const(True, False, True),
                gemm_cfgs, ("stride_on", "stride_xk", "stride_wk", "stride_lr", "stride_rr"), pipelined=half,
                descriptors=gemm_descriptors(True)),
        Variant("adapter GEMM (dx, dropout)", lora._gemm_lowrank_kernel, gemm_sig, gemm_const(False, True, False),
                gemm_cfgs, ("stride_on", "stride_xk", "stride_wn", "stride_lr", "stride_rn", "stride_kn"),
                pipelined=half, descriptors=gemm_descriptors(False)),
        Variant("dy low-rank", lora._dy_lowrank_kernel, dy_sig, dy_const, lora._dy_lowrank_tuned.configs,
                ("stride_dyn", "stride_br", "stride_sr", "stride_ur", "stride_dbr")),
    ]  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every config for every dtype and arch (slow)")
    args = ap.parse_args(argv)
    failures = 0
    start = time.perf_counter()
    for cap in (90, 80):
        target = GPUTarget("cuda", cap, 32)
        for dtype in ("bf16", "fp16", "fp32"):
            for v in kernels(dtype):
                # Hopper bf16 (the case that matters most) compiles every config; elsewhere the
                # configs compile in order until one fits, since the autotuner skips those that do not.
                every = args.all or (cap == 90 and dtype == "bf16")
                fits = 0
                for cfg in v.configs:
                    if Variant.tma_config(cfg) and (cap < 90 or not v.tma):
                        continue  # the launcher gives descriptors on sm_90+ and to 16-bit operands only
                    label = f"sm_{cap} {dtype} {v.name} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                    try:
                        k = v.compile(cfg, target)
                    except Exception as e:  # noqa: BLE001 - report every failing config, then fail
                        failures += 1
                        print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                        continue
                    smem = k.metadata.shared
                    ok = smem <= SMEM_LIMIT[cap]
                    fits += ok
                    ptx = k.asm["ptx"]
                    async_loads = ptx.count("cp.async.cg") + ptx.count("cp.async.ca") + ptx.count("cp.async.bulk")
                    print(
                        f"{'ok  ' if ok else 'big '} {label}: shared {smem} B, ptx {len(ptx)} chars, "
                        f"{async_loads} async copies, {ptx.count('wgmma.mma_async')} wgmma"
                    )
                    if ok and Variant.tma_config(cfg):
                        # Every descriptor's tiles must come through the copy engine: one asynchronous
                        # TMA copy from each in the TTGIR (a tl.load of one operand would leave it out).
                        missing = Variant.tma_loads_missing(k.asm["ttgir"], v.descriptors)
                        if missing:
                            failures += 1
                            print(f"FAIL {label}: no TMA copy from {', '.join(missing)}")
                    elif ok and v.pipelined and cfg.num_stages > 1:
                        # A data-dependent branch or an unaligned access in the loop stops Triton's
                        # pipeliner; the kernel then waits on every load.
                        tiles = Variant.async_tile_loads(k.asm["ttgir"], dtype)
                        if tiles < 2:
                            failures += 1
                            print(f"FAIL {label}: {tiles} of the dot operands' tile loads are pipelined (want both)")
                    if fits and not every:
                        break
                if not fits:
                    failures += 1
                    print(f"FAIL sm_{cap} {dtype} {v.name}: no config fits in {SMEM_LIMIT[cap]} B of shared memory")
                if v.tma and cap == 90:
                    # A pointer config with the (unread) descriptors as arguments must still compile
                    # and pipeline its loads.
                    cfg = v.configs[0]
                    label = (
                        f"sm_{cap} {dtype} {v.name} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}, descriptors given"
                    )
                    try:
                        k = v.compile(cfg, target, descriptors_given=True)
                        tiles = Variant.async_tile_loads(k.asm["ttgir"], dtype)
                        print(f"{'ok  ' if tiles >= 2 else 'FAIL'} {label}: {tiles} pipelined tile loads")
                        failures += tiles < 2
                    except Exception as e:  # noqa: BLE001
                        failures += 1
                        print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s) in {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
