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


def kernels(dtype: str):
    """(name, jit function, signature, constexprs, configs) for each kernel, most-featured path."""
    dt = TRITON_DTYPE[dtype]
    precision = "ieee" if dtype == "fp32" else "tf32"
    cov_sig = signature(
        cov._cov_triangle_kernel, {"acc_ptr": "fp32", "x_ptr": dt, "keep_ptr": "u8", "scale_ptr": "fp32"}
    )
    cov_const = {"HAS_KEEP": True, "HAS_SCALE": True, "THREE_D": True, "INPUT_PRECISION": precision}
    gemm_sig = signature(
        lora._gemm_lowrank_kernel,
        {
            "out_ptr": dt,
            "x_ptr": dt,
            "w_ptr": dt,
            "bias_ptr": dt,
            "l_ptr": "fp32",
            "r_ptr": dt,
            "keep_ptr": "u8",
        },
        floats=("alpha", "keep_scale"),
    )
    gemm_const = {"HAS_BIAS": True, "HAS_KEEP": True, "INPUT_PRECISION": precision, "BLOCK_RANK": 64}
    dy_sig = signature(
        lora._dy_lowrank_kernel,
        {"dy_ptr": dt, "b_ptr": dt, "s_ptr": dt, "u_ptr": "fp32", "db_ptr": "fp32"},
    )
    dy_const = {
        "NEED_U": True,
        "NEED_DB": True,
        "INPUT_PRECISION": precision,
        "BLOCK_RANK": 128,
    }  # the widest rank tile
    return [
        ("covariance triangle", cov._cov_triangle_kernel, cov_sig, cov_const, cov._cov_triangle_tuned.configs),
        ("adapter GEMM", lora._gemm_lowrank_kernel, gemm_sig, gemm_const, lora._gemm_lowrank_tuned.configs),
        ("dy low-rank", lora._dy_lowrank_kernel, dy_sig, dy_const, lora._dy_lowrank_tuned.configs),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="every config for every dtype and arch (slow)")
    args = ap.parse_args(argv)
    failures = 0
    start = time.perf_counter()
    for cap in (90, 80):
        target = GPUTarget("cuda", cap, 32)
        for dtype in ("bf16", "fp16", "fp32"):
            for name, fn, sig, const, configs in kernels(dtype):
                # Hopper bf16 (the case that matters most) compiles every config; elsewhere the
                # configs compile in order until one fits, since the autotuner skips those that do not.
                every = args.all or (cap == 90 and dtype == "bf16")
                fits = 0
                for cfg in configs:
                    label = f"sm_{cap} {dtype} {name} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                    try:
                        src = ASTSource(fn=fn, signature=sig, constexprs={**const, **cfg.kwargs})
                        k = triton.compile(
                            src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                        )
                    except Exception as e:  # noqa: BLE001 - report every failing config, then fail
                        failures += 1
                        print(f"FAIL {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                        continue
                    smem = k.metadata.shared
                    ok = smem <= SMEM_LIMIT[cap]
                    fits += ok
                    print(f"{'ok  ' if ok else 'big '} {label}: shared {smem} B, ptx {len(k.asm['ptx'])} chars")
                    if fits and not every:
                        break
                if not fits:
                    failures += 1
                    print(f"FAIL sm_{cap} {dtype} {name}: no config fits in {SMEM_LIMIT[cap]} B of shared memory")
    print(f"{'FAILED' if failures else 'passed'}: {failures} failure(s) in {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
