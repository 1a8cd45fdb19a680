"""Covariance collection and decomposition: corda_kernels vs PEFT's CorDA, in one process.

Times, on the same model and data:
  1. a plain forward over the calibration batches;
  2. PEFT's covariance collection (its hooks, one sequence at a time, as it requires);
  3. corda_kernels.collect_cov (batched, padded);
  4. PEFT's eigen step (collect_eigens) vs our decomposition of every layer,
     both on PEFT's covariances, with the error of each against a float64 reference.

Medians over --repeats runs, candidates interleaved.

With --memory (several minutes more: 20 processes), the memory of the same five stages, each
run once per fresh process (this script re-invoked with a hidden --_stage
flag), so that no stage inherits another's allocations or allocator state.
The child builds the model (for the decomposition rows it loads PEFT's
covariances from a file this run wrote) and runs a small warm-up (a 16-token
forward, or a 64x64 decomposition by both libraries), so that one-time library
start-up (oneDNN, LAPACK, lazy imports such as scipy) is not charged to a
stage. Then gc, glibc's malloc_trim(0), an mlock of the file-backed mappings
(this VM pages cold library pages out: without the lock a stage's RSS fell
by up to 86 MB), a reset of the kernel's peak-RSS counter (writing 5 to
/proc/self/clear_refs sets VmHWM to the current RSS), the stage, and VmHWM and
VmRSS from /proc/self/status: the peak is VmHWM minus the RSS before the stage.
With glibc's default malloc this peak also counts freed blocks malloc keeps
(collect_cov's varied from 191 to 365 MiB between identical processes), hence
the median of --memory-runs processes; a second setting
(MALLOC_MMAP_THRESHOLD_=65536: freed blocks of 64 KiB or more are unmapped at
once) tracks the live tensors and repeats to within 0.1 MiB. Where clear_refs
is not writable the RSS columns are skipped (said so), never guessed. Always
given with --memory, exactly, from tensor shapes: the bytes each stage leaves
(PEFT: every target module's covariance buffer, then its full eigens; ours:
the Covariances matrices, one per shared q/k/v or gate/up group, then the
adapter factors A and B).

Prints the tables and, with --record, appends them to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
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


def setup(args):
    """Model, batches, the same batches as single sequences (PEFT's input), and PEFT's LoRA config."""
    model = build(args)
    # Full-length sequences: PEFT cannot mask padding, so both see the same tokens.
    batches = synthetic_batches(args.vocab, n=args.seqs, seq=args.seq, batch=args.batch)
    for b in batches:
        b["attention_mask"].fill_(1)
    sequences = [row for b in batches for row in b["input_ids"]]
    return model, batches, sequences, peft_config(args.rank, "kpm")


def make_stages(args, model, batches, sequences, cfg):
    """The benchmarked stages, as callables; the timing loop and the memory runs call the same functions."""
    from peft.tuners.lora import corda as peft_corda

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

    def peft_eigen():
        peft_corda.collect_eigens(model, cfg, False)

    def ours_decompose(covs_shared):
        mods, p = plan(model, covs_shared, args.rank, "kpm", targets=TARGETS)
        return decompose_all(mods, covs_shared, p, "kpm")

    return plain, ours, peft_collect, peft_eigen, ours_decompose


def share_groups(peft_covs, groups):
    """One of PEFT's matrices per input group, shared by its members, as our pipeline does."""
    covs_shared = {}
    for g in groups:
        c = peft_covs[g[0]]
        for n in g:
            covs_shared[n] = c
    return covs_shared


# ----------------------------------------------------------------------------- memory
MIB = 2**20
# Stage keys of the memory runs, in the order of the timing table's rows.
MEMORY_STAGES = ("plain", "peft_collect", "collect_cov", "peft_eigen", "ours_decompose")
FORWARD_STAGES = ("plain", "peft_collect", "collect_cov")


def proc_memory() -> dict[str, int]:
    """This process's VmRSS and VmHWM (peak RSS since start or since the last reset), in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024  # the file says kB (KiB)
    return out


def reset_peak_rss() -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0; raises OSError where clear_refs cannot be written)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_free_heap() -> bool:
    """glibc's malloc_trim(0): give the free pages malloc still holds back to the kernel, so that the
    pre-stage RSS counts live memory only and a stage cannot reuse earlier frees unseen. False elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def pin_file_pages() -> bool:
    """mlock every file-backed mapping (shared libraries, mostly): RSS counts those pages too, and a
    VM that pages cold ones out (DAMON) or a first touch of library code during the stage would move
    the RSS by amounts that are not the stage's data. Anonymous memory is left alone. False when a
    mapping could not be locked (no CAP_IPC_LOCK and a small RLIMIT_MEMLOCK, or no glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        ok = True
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/") or fields[1].startswith("---"):
                continue  # anonymous, [heap]/[stack]/[vdso], or a PROT_NONE gap between a library's segments
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if libc.mlock(lo, hi - lo) != 0:
                ok = False
        return ok
    except (OSError, AttributeError, ValueError):
        return False


def memory_unavailable() -> str | None:
    """Why peak RSS cannot be measured in this environment, or None when it can."""
    try:
        reset_peak_rss()
        st = proc_memory()
    except OSError as e:
        return f"/proc/self/clear_refs or /proc/self/status is not usable here ({type(e).__name__}: {e})"
    if "VmRSS" not in st or "VmHWM" not in st:
        return "/proc/self/status has no VmRSS/VmHWM"
    if st["VmHWM"] > st["VmRSS"] + MIB:
        return "writing 5 to /proc/self/clear_refs did not reset VmHWM"
    return None


def _warm_decomposition() -> None:
    """Both libraries' decomposition once on a 64x64 layer: imports (scipy) and LAPACK start-up, a few KiB of data."""
    from peft.tuners.lora import corda as peft_corda

    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(256, 64)
    lin.covariance_matrix = x.T @ x / 256
    peft_corda.collect_eigens_for_layer(lin, None)
    tiny = torch.nn.Sequential(lin)
    covs = {"0": lin.covariance_matrix}
    mods, p = plan(tiny, covs, 16, "kpm")
    decompose_all(mods, covs, p, "kpm")


def run_memory_stage(args) -> int:
    """Child process: set up, warm up, reset the peak-RSS counter, run one stage once, print its RSS figures."""
    from peft.tuners.lora import corda as peft_corda

    model, batches, sequences, cfg = setup(args)
    plain, ours, peft_collect, peft_eigen, ours_decompose = make_stages(args, model, batches, sequences, cfg)
    stage = args._stage
    if stage in FORWARD_STAGES:
        with torch.no_grad():
            model(input_ids=sequences[0][:16].unsqueeze(0), use_cache=False)
        run = {"plain": plain, "peft_collect": peft_collect, "collect_cov": ours}[stage]
    else:
        saved = torch.load(args._covs, weights_only=True)
        peft_covs = saved["covs"]
        _warm_decomposition()
        if stage == "peft_eigen":
            for n, m in peft_corda.target_modules(model, cfg):
                m.covariance_matrix = peft_covs[n]
            run = peft_eigen
        else:
            # peft_covs stays referenced, as in the PEFT child: both start from the same resident data.
            covs_shared = share_groups(peft_covs, saved["groups"])

            def run():
                return ours_decompose(covs_shared)

    gc.collect()
    trimmed = release_free_heap()
    pinned = pin_file_pages()
    reset_peak_rss()
    before = proc_memory()
    if before["VmHWM"] > before["VmRSS"] + MIB:
        print(json.dumps({"error": "writing 5 to /proc/self/clear_refs did not reset VmHWM"}))
        return 1
    out = run()
    after = proc_memory()
    # What the stage really keeps (its result, caches), without the free memory malloc still holds.
    gc.collect()
    release_free_heap()
    kept = proc_memory()["VmRSS"]
    del out
    fig = {"before": before["VmRSS"], "peak": after["VmHWM"], "after": after["VmRSS"], "kept": kept}
    fig.update(trimmed=trimmed, pinned=pinned)
    print("MEMORY " + json.dumps(fig))
    return 0


# The second allocator setting: every block of 64 KiB or more gets its own mapping, returned to the kernel
# when freed, so the RSS follows the live tensors (glibc's default raises this threshold up to 32 MiB as
# large blocks are freed, and then keeps freed blocks in the heap, where they still count as resident).
LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(extra)
    return env


def measure_memory(args, peft_covs, groups) -> dict | str:
    """{"default": {stage: [figures, one per process]}, "live": {stage: figures}}, figures in bytes
    (None for a failed process); or a string saying why nothing can be measured here."""
    why = memory_unavailable()
    if why is not None:
        return why
    sizes = []
    for key in ("hidden", "intermediate", "layers", "vocab", "seqs", "seq", "batch", "rank"):
        sizes += [f"--{key}", str(getattr(args, key))]
    out = {"default": {k: [] for k in MEMORY_STAGES}, "live": {}}
    with tempfile.TemporaryDirectory(prefix="bench_collect_") as tmp:
        path = os.path.join(tmp, "peft_covs.pt")
        torch.save({"covs": peft_covs, "groups": [list(g) for g in groups]}, path)

        def child(stage, env):
            cmd = [sys.executable, os.path.abspath(__file__), *sizes, "--_stage", stage, "--_covs", path]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(env))
            line = next((x for x in proc.stdout.splitlines() if x.startswith("MEMORY ")), None)
            if proc.returncode != 0 or line is None:
                print(f"bench_collect.py: memory stage {stage!r} failed (exit {proc.returncode}):", file=sys.stderr)
                print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
                return None
            return json.loads(line[len("MEMORY ") :])

        for _ in range(args.memory_runs):
            for stage in MEMORY_STAGES:
                out["default"][stage].append(child(stage, {}))
        for stage in MEMORY_STAGES:
            out["live"][stage] = child(stage, LIVE_ENV)
    return out


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among ``tensors`` (a shared matrix counts once)."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def memory_table(labels: dict[str, str], mem: dict | str, held: dict[str, tuple[int, str]], runs: int) -> str:
    """Markdown table of the memory runs (or the reason they were skipped) and of the bytes each stage leaves."""
    how = (
        "Memory, MiB: every figure comes from a fresh process per stage and run, which builds the model, runs a "
        "small warm-up, then gc, malloc_trim(0), mlock of file-backed mappings (so that paging-out of cold "
        "library pages, or their first touch, does not move the RSS), VmHWM reset through /proc/self/clear_refs, "
        "the stage once, and reads /proc/self/status. Peak = VmHWM after the stage minus VmRSS before it. "
        f"Default malloc: glibc as shipped, median (min-max) of {runs} processes. Live: MALLOC_MMAP_THRESHOLD_=65536, "
        "so freed blocks of 64 KiB or more leave the RSS at once (close to the peak of live tensor bytes; one "
        "process). Kept = VmRSS after the stage, result still referenced, after gc + malloc_trim(0), minus VmRSS "
        "before it (live run). Held = exact bytes of the stage's result tensors, from their shapes."
    )
    lines = [how, ""]
    if isinstance(mem, str):
        lines += [f"RSS not measured: {mem}.", ""]
        lines += ["| stage | held at the end (exact) |", "| --- | --- |"]
        for key in MEMORY_STAGES:
            b, what = held.get(key, (0, ""))
            lines.append(f"| {labels[key]} | {f'{b / MIB:.1f} ({what})' if what else '-'} |")
        return "\n".join(lines)

    def deltas(figs, field):
        return [(f[field] - f["before"]) / MIB for f in figs if f is not None]

    default_peak = {k: deltas(v, "peak") for k, v in mem["default"].items()}
    live_peak = {k: deltas([v], "peak") for k, v in mem["live"].items()}
    kept = {k: deltas([v], "kept") for k, v in mem["live"].items()}

    def med(vals):
        return statistics.median(vals) if vals else None

    def vs_peft(key, table):
        peer = {"collect_cov": "peft_collect", "ours_decompose": "peft_eigen"}.get(key)
        if peer is None or not table[key] or not table[peer] or not med(table[peer]):
            return ""
        return f"{med(table[key]) / med(table[peer]):.2f}x PEFT's"

    lines += [
        "| stage | peak, default malloc | vs PEFT | peak, live | vs PEFT | kept | held at the end (exact) |",
        "| --- | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for key in MEMORY_STAGES:
        d = default_peak[key]
        cell_d = "failed" if not d else f"{med(d):.1f} ({min(d):.1f}-{max(d):.1f})" if len(d) > 1 else f"{d[0]:.1f}"
        if d and len(d) < runs:
            cell_d += f", {len(d)} of {runs} runs"
        cell_l = f"{live_peak[key][0]:.1f}" if live_peak[key] else "failed"
        cell_k = f"{kept[key][0]:.1f}" if kept[key] else "failed"
        b, what = held.get(key, (0, ""))
        cells = [labels[key], cell_d, vs_peft(key, default_peak), cell_l, vs_peft(key, live_peak), cell_k]
        cells.append(f"{b / MIB:.1f} ({what})" if what else "-")
        lines.append("| " + " | ".join(cells) + " |")
    figs = [f for v in mem["default"].values() for f in v] + list(mem["live"].values())
    if any(f is not None and not (f.get("trimmed") and f.get("pinned")) for f in figs):
        lines += [
            "",
            "Caveat: malloc_trim or the mlock of file pages failed in some runs: their figures are less exact.",
        ]
    return "\n".join(lines)


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
    ap.add_argument(
        "--memory",
        action="store_true",
        help="also measure each stage's peak RSS, in fresh processes (adds a few minutes)",
    )
    ap.add_argument("--memory-runs", type=int, default=3, help="processes per stage for the default-malloc peak")
    ap.add_argument("--_stage", choices=MEMORY_STAGES, help=argparse.SUPPRESS)  # child process of --memory
    ap.add_argument("--_covs", help=argparse.SUPPRESS)
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
    if args._stage is not None:
        return run_memory_stage(args)

    from peft.tuners.lora import corda as peft_corda

    model, batches, sequences, cfg = setup(args)
    plain, ours, peft_collect, peft_eigen, ours_decompose = make_stages(args, model, batches, sequences, cfg)

    t = {"plain forward": [], "PEFT collection": [], "collect_cov": []}
    for _ in range(args.repeats):  # interleaved
        t["plain forward"].append(timed(plain)[0])
        t["PEFT collection"].append(timed(peft_collect)[0])
        t["collect_cov"].append(timed(ours)[0])
    med = {k: statistics.median(v) for k, v in t.items()}

    # Decomposition on PEFT's covariances (same input for both).
    modules = dict(peft_corda.target_modules(model, cfg))
    peft_covs = {n: m.covariance_matrix.clone() for n, m in modules.items()}
    peft_cov_bytes = sum(m.covariance_matrix.numel() * m.covariance_matrix.element_size() for m in modules.values())
    ours_covs = ck.collect_cov(model, batches[:1], progress=False)
    covs_shared = share_groups(peft_covs, ours_covs.groups)  # share one matrix per input group, as our pipeline does

    td, tp = [], []
    for _ in range(args.repeats):
        tp.append(timed(peft_eigen)[0])
        td.append(timed(lambda: ours_decompose(covs_shared))[0])
    med["PEFT eigen step"] = statistics.median(tp)
    med["our decomposition"] = statistics.median(td)
    factors = ours_decompose(covs_shared)
    err_ours, err_peft = [], []
    eigen_bytes = 0
    r = args.rank
    for n, m in modules.items():
        w = m.weight.detach()
        A_ref, B_ref, _ = context_svd_reference(w, covs_shared[n], r, "kpm")
        ref = B_ref @ A_ref
        A, B = factors[n]
        err_ours.append(float((B.double() @ A.double() - ref).norm() / w.double().norm()))
        e = m.eigens
        eigen_bytes += tensor_bytes([e.U_WC, e.S_WC, e.V_WC])
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
    print(text, flush=True)

    if args.memory:
        labels = dict(zip(MEMORY_STAGES, (row[0] for row in rows)))
        held = {
            "peft_collect": (peft_cov_bytes, f"{len(modules)} covariance buffers, one per target"),
            "collect_cov": (
                tensor_bytes(ours_covs.matrices()),
                f"{len(ours_covs.groups)} Covariances matrices, one per input group",
            ),
            "peft_eigen": (eigen_bytes, "full U, S, V per target"),
            "ours_decompose": (tensor_bytes(t for ab in factors.values() for t in ab), f"A, B of rank {r} per target"),
        }
        del factors
        mem = measure_memory(args, peft_covs, ours_covs.groups)
        mtext = memory_table(labels, mem, held, args.memory_runs)
        print()
        print(mtext)
        text += "\n\n" + mtext
    if args.record:
        path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        cmd = " ".join(sys.argv[1:] if argv is None else argv)
        with open(path, "a") as f:
            f.write(
                f"\n### bench_collect.py, {stamp}, CPU dev machine\n\n`python bench/bench_collect.py {cmd}`\n\n{text}\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
