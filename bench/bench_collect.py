"""Covariance collection and decomposition: corda_kernels vs PEFT's CorDA, in one process.

Times, on the same model and data:
  1. a plain forward over the calibration batches;
  2. PEFT's covariance collection (its hooks, one sequence at a time, as it requires);
  3. corda_kernels.collect_cov (batched, padded);
  4. PEFT's eigen step (collect_eigens) vs our decomposition of every layer,
     both on PEFT's covariances, with the error of each against a float64 reference.

Medians over --repeats runs, candidates interleaved. Prints a table and, with
--record, appends it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import corda_kernels as ck  # noqa: E402
from corda_kernels.decompose import context_svd_reference  # noqa: E402
from corda_kernels.demo import synthetic_batches  # noqa: E402
from corda_kernels.rewrite import decompose_all, plan  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
        max_position_embeddings=max(512, args.seq),
    )
    return LlamaForCausalLM(cfg).eval()


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def peft_config(rank, mode):
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig

    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=mode),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny config, one repeat (smoke run)")
    ap.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab, args.seqs, args.seq, args.repeats = (
            128,
            344,
            2,
            512,
            8,
            64,
            1,
        )

    from peft.tuners.lora import corda as peft_corda

    model = build(args)
    # Full-length sequences: PEFT cannot mask padding, so both see the same tokens.
    batches = synthetic_batches(args.vocab, n=args.seqs, seq=args.seq, batch=args.batch)
    for b in batches:
        b["attention_mask"].fill_(1)
    sequences = [row for b in batches for row in b["input_ids"]]
    cfg = peft_config(args.rank, "kpm")

    def plain():
        with torch.no_grad():
            for b in batches:
                model(**b, use_cache=False)

    def ours():
        return ck.collect_cov(model, batches, progress=False)

    def peft_collect():
        def run_model():
            for ids in sequences:
                model(input_ids=ids.unsqueeze(0), use_cache=False)

        peft_corda.calib_cov_distribution(model, cfg, run_model, None, None)

    t = {"plain forward": [], "PEFT collection": [], "collect_cov": []}
    for _ in range(args.repeats):  # interleaved
        t["plain forward"].append(timed(plain)[0])
        t["PEFT collection"].append(timed(peft_collect)[0])
        t["collect_cov"].append(timed(ours)[0])
    med = {k: statistics.median(v) for k, v in t.items()}

    # Decomposition on PEFT's covariances (same input for both).
    modules = dict(peft_corda.target_modules(model, cfg))
    peft_covs = {n: m.covariance_matrix.clone() for n, m in modules.items()}
    covs_shared = {}
    by_ptr = {}
    ours_covs = ck.collect_cov(model, batches[:1], progress=False)
    for g in ours_covs.groups:  # share one matrix per input group, as our pipeline does
        c = peft_covs[g[0]]
        for n in g:
            covs_shared[n] = c
            by_ptr[n] = c

    def ours_decompose():
        mods, p = plan(model, covs_shared, args.rank, "kpm", targets=TARGETS)
        return decompose_all(mods, covs_shared, p, "kpm")

    td, tp = [], []
    for _ in range(args.repeats):
        tp.append(timed(lambda: peft_corda.collect_eigens(model, cfg, False))[0])
        td.append(timed(ours_decompose)[0])
    med["PEFT eigen step"] = statistics.median(tp)
    med["our decomposition"] = statistics.median(td)
    factors = ours_decompose()
    err_ours, err_peft = [], []
    r = args.rank
    for n, m in modules.items():
        w = m.weight.detach()
        A_ref, B_ref, _ = context_svd_reference(w, covs_shared[n], r, "kpm")
        ref = B_ref @ A_ref
        A, B = factors[n]
        err_ours.append(float((B.double() @ A.double() - ref).norm() / w.double().norm()))
        e = m.eigens
        pd = (e.U_WC[:, -r:].double() * e.S_WC[-r:].double()) @ e.V_WC[:, -r:].double().T
        err_peft.append(float((pd - ref).norm() / w.double().norm()))
        del m.eigens

    rows = [
        (f"plain forward (batches of {args.batch})", med["plain forward"], "1.00x forward"),
        (
            "PEFT collection (batch 1)",
            med["PEFT collection"],
            f"{med['PEFT collection'] / med['plain forward']:.2f}x forward",
        ),
        (
            "corda_kernels.collect_cov",
            med["collect_cov"],
            f"{med['collect_cov'] / med['plain forward']:.2f}x forward; "
            f"**{med['PEFT collection'] / med['collect_cov']:.2f}x faster than PEFT**",
        ),
        (f"PEFT eigen step ({len(modules)} layers)", med["PEFT eigen step"], f"max error vs fp64 {max(err_peft):.1e}"),
        (
            "our decomposition",
            med["our decomposition"],
            f"max error vs fp64 {max(err_ours):.1e}; **{med['PEFT eigen step'] / med['our decomposition']:.2f}x faster**",
        ),
    ]
    head = (
        f"Llama hidden={args.hidden} inter={args.intermediate} layers={args.layers} vocab={args.vocab}; "
        f"{args.seqs} sequences x {args.seq} tokens; rank {args.rank} KPM; median of {args.repeats}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    table = [head, "", "| stage | seconds | ratio |", "| --- | --- | --- |"]
    table += [f"| {a} | {b:.3f} | {c} |" for a, b, c in rows]
    text = "\n".join(table)
    print(text)
    if args.record:
        path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        with open(path, "a") as f:
            f.write(
                f"\n### bench_collect.py, {stamp}, CPU dev machine\n\n`python bench/bench_collect.py --record`\n\n{text}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
