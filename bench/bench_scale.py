"""Time and peak memory of each stage at realistic layer widths (the unit tests' models are tiny).

A Llama from config (default hidden 2048, intermediate 5504, 4 layers, vocab 1024; random
weights, nothing downloaded), synthetic padded batches, then: a plain forward, collect_cov,
build_corda, merge_corda, and with --candidates N the CorDA++ chain (candidate collection,
selection, allocation, build). For each stage: seconds, and the peak RSS above the RSS
before it (the kernel's VmHWM, reset through /proc/self/clear_refs; Linux only).

Run it with MALLOC_MMAP_THRESHOLD_=65536 so that freed blocks leave the RSS at once and the
peak follows the live tensors; glibc's default keeps freed blocks and the peak then also
counts allocator reuse.

    MALLOC_MMAP_THRESHOLD_=65536 python bench/bench_scale.py [--layers 4] [--candidates 2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import time
import warnings

import torch

import corda_kernels as ck
from corda_kernels.demo import synthetic_batches


def _status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Stage:
    """Times a block and records its peak RSS above the RSS before it (None where unmeasurable)."""

    rows: list[tuple[str, float, float | None]] = []

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        gc.collect()
        _trim()
        self.hwm_ok = _reset_hwm()
        self.r0 = _status("VmRSS:")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        peak = _status("VmHWM:")
        over = peak - self.r0 if self.hwm_ok and peak is not None and self.r0 is not None else None
        Stage.rows.append((self.name, dt, over))
        print(f"{self.name}: {dt:.2f} s, peak +{over:.0f} MiB" if over is not None else f"{self.name}: {dt:.2f} s")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--candidates", type=int, default=0, help="also run CorDA++ with N candidate rounds")
    ap.add_argument("--keep-spectra", type=int, default=1, help="CorDA++ keep_spectra (1 or 0)")
    a = ap.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=1024,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).float().eval()
    targets = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    batches = synthetic_batches(cfg.vocab_size, n=4 * a.batches, seq=128, batch=4)
    print(
        f"Llama hidden={a.hidden} inter={a.intermediate} layers={a.layers}: target weights {targets * 4 / 2**20:.0f} MiB "
        f"(fp32); {len(batches)} batches of 4 x 128 tokens; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {platform.machine()}; MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}"
    )
    warnings.simplefilter("ignore")
    with Stage("plain forward"), torch.no_grad():
        for b in batches:
            model(**b, use_cache=False)
    with Stage("collect_cov"):
        covs = ck.collect_cov(model, batches, progress=False)
    with Stage(f"build_corda kpm r{a.rank}"):
        ck.build_corda(model, covs, rank=a.rank)
    with Stage("merge_corda"):
        ck.merge_corda(model)
    if a.candidates:
        keep = bool(a.keep_spectra)
        with Stage(f"collect_cov candidates={a.candidates} keep_spectra={keep}"):
            cands = ck.collect_cov(model, batches, candidates=a.candidates, keep_spectra=keep, progress=False)
        with Stage("select_covariances"):
            sel = ck.select_covariances(model, cands)
        with Stage("allocate_ranks budget=1.0"):
            ranks = ck.allocate_ranks(model, sel, budget=1.0, rank=a.rank, keep_spectra=keep)
        with Stage("build_corda (CorDA++ ranks)"):
            ck.build_corda(model, sel, ranks=ranks)

    print("\n| stage | seconds | peak above start, MiB |\n| --- | ---: | ---: |")
    for name, dt, over in Stage.rows:
        print(f"| {name} | {dt:.2f} | {'-' if over is None else f'{over:.0f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
