"""CPU timings of the ops' torch paths against the plain alternatives, in one process.

  1. covariance update: ours (recursive upper triangle, corda_kernels.ops.covariance_update
     on the CPU) vs a plain full ``acc.addmm_(x.T, x)``, fp32, rows = 2048;
  2. adapter linear, forward + backward: ops.lora_linear vs PEFT's LoRA ``Linear``
     (frozen nn.Linear base, r = 16) vs the bare frozen nn.Linear, x requiring grad.

Candidates are interleaved within each repeat so drifting clocks hit all of them
alike; the table reports medians and ratios. ``--sweep`` adds other leaf sizes
and fixed row bands for the triangle update (how TORCH_LEAF in ops/covariance.py was chosen).

    python bench/bench_ops.py            # full sizes
    python bench/bench_ops.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from corda_kernels import ops  # noqa: E402
from corda_kernels.ops import covariance as cov_mod  # noqa: E402


def interleaved(cands: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds per candidate; each repeat runs every candidate once, in turn."""
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def covariance_candidates(acc, x, sweep):
    d = acc.shape[0]
    leaf = cov_mod.TORCH_LEAF
    label = f"ours (recursive, leaf {leaf})" if d > leaf else "ours (d <= leaf: one addmm_)"
    cands = {
        label: lambda: ops.covariance_update(acc, x, backend="torch"),
        "acc.addmm_(x.T, x)": lambda: acc.addmm_(x.T, x),
    }
    if sweep:
        for leaf in (128, 192, 256):
            if leaf != cov_mod.TORCH_LEAF and d > leaf:
                cands[f"leaf {leaf}"] = lambda leaf=leaf: cov_mod.covariance_update_torch(acc, x, leaf=leaf)
        for band in (128, 192, 384):
            if d > 2 * band:
                cands[f"row bands {band}"] = lambda band=band: cov_mod.covariance_update_torch(acc, x, band=band)
    return cands


def bench_covariance(dims, rows, repeats, sweep):
    out = []
    for d in dims:
        torch.manual_seed(0)
        x = torch.randn(rows, d)
        acc = torch.zeros(d, d)
        med = interleaved(covariance_candidates(acc, x, sweep), repeats)
        base = med["acc.addmm_(x.T, x)"]
        for name, t in med.items():
            out.append((f"covariance d={d} rows={rows}", name, t, base / t))
    return out


def bench_lora(M, K, N, r, repeats):
    from peft_layer import peft_lora_linear

    torch.manual_seed(0)
    x = torch.randn(M, K, requires_grad=True)
    dy = torch.randn(M, N)

    base = nn.Linear(K, N)
    base.requires_grad_(False)
    peft_layer = peft_lora_linear(nn.Linear(K, N), r)
    nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.02)

    W, b = base.weight.detach(), base.bias.detach()
    A = (torch.randn(r, K) / K**0.5).requires_grad_()
    B = (torch.randn(N, r) * 0.02).requires_grad_()

    def step(fn):
        def run():
            x.grad = None
            fn().backward(dy)

        return run

    cands = {
        "nn.Linear (frozen)": step(lambda: base(x)),
        "ops.lora_linear": step(lambda: ops.lora_linear(x, W, b, A, B, 1.0, backend="torch")),
        "PEFT lora.Linear": step(lambda: peft_layer(x)),
    }
    med = interleaved(cands, repeats)
    label = f"adapter fwd+bwd M={M} K={K} N={N} r={r}"
    base_t = med["PEFT lora.Linear"]
    return [(label, name, t, base_t / t) for name, t in med.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--dims", type=int, nargs="+", default=[512, 1376, 2048])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sweep", action="store_true", help="also time other triangle leaf sizes and row bands")
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lora_shape = (4096, 1024, 1024, 16)
    if args.quick:
        args.rows, args.dims, args.repeats = 256, [256, 600], 2
        lora_shape = (256, 128, 96, 16)

    rows = bench_covariance(args.dims, args.rows, args.repeats, args.sweep)
    rows += bench_lora(*lora_shape, args.repeats)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"median of {args.repeats}, candidates interleaved; fp32 on the CPU"
    )
    print()
    print("| case | candidate | ms | speed-up |")
    print("| --- | --- | ---: | ---: |")
    for case, name, t, ratio in rows:
        print(f"| {case} | {name} | {t * 1e3:.2f} | {ratio:.2f}x |")
    print()
    print("speed-up: vs acc.addmm_ for covariance rows, vs PEFT lora.Linear for adapter rows (higher is faster).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
