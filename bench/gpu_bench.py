"""GPU timings of the Triton ops against torch and PEFT (run by bench/gpu_check.sh on an H200).

  (a) covariance update, bf16 x, fp32 accumulator: the upper-triangle kernel vs
      torch.addmm on an fp32 upcast of x and vs torch.mm(..., out_dtype=fp32);
      TFLOP/s counts the useful work rows·d·(d+1) (the triangle) for every
      candidate, and "% peak" is against dense bf16 tensor-core peak (989 TFLOP/s,
      H200/H100 SXM datasheet).
  (b) adapter linear, forward + backward, bf16: ops.lora_linear (Triton) vs the
      frozen base nn.Linear alone and vs PEFT's LoRA Linear.
  In (a) and (b) the Triton kernels run three times where TMA is possible (sm_90,
  Triton >= 3.4): as by default; with CORDA_KERNELS_TMA=0, pointer loads only; and
  with CORDA_KERNELS_TMA=1, TMA configs also where the default leaves them out
  (dx's GEMM, small covariance updates). --tma off drops those rows; --tma only
  keeps just our kernels (and the base linear and cuBLAS rows they are read
  against), so that gpu_check.sh can time the settings apart, in processes of
  their own.
  (c) end to end on a Llama-shaped model built from a config (random weights):
      corda_kernels.collect_cov vs PEFT's CorDA covariance collection.

CUDA events, warm-ups, medians; candidates interleaved. In (b) and (c) a
"peak MiB" column: after the timing, each candidate runs once more between
torch.cuda.reset_peak_memory_stats() and torch.cuda.max_memory_allocated(),
and the column gives that peak minus torch.cuda.memory_allocated() just
before the run (tensors the caching allocator hands out; its reserve is not
counted). Gradients and PEFT's buffers are cleared before that run, so they
count as part of it. "n/a" off CUDA (the CPU smoke test). Each section runs in its
own try/except and prints an error row instead of aborting the script (and the
exit code is then 1); gpu_check.sh also runs each section in its own process,
so a CUDA fault or a hang in one loses only that section. After each section
the report lists the tile configs the autotuners picked. Sizes are chosen so
the whole script, autotuning included, takes a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

PEAK_BF16 = 989e12  # dense bf16, H100/H200 SXM datasheet
DEV, DTYPE = "cuda", torch.bfloat16  # module globals so a CPU smoke harness can swap them


TMA_TITLE = {"only": ": by default, with pointer loads only (CORDA_KERNELS_TMA=0) and with TMA wherever allowed (=1)"}
TMA_SETTINGS = ("0", "1")


@contextlib.contextmanager
def tma_env(value: str):
    """CORDA_KERNELS_TMA set to value (the kernels read it per call), restored after."""
    old = os.environ.get("CORDA_KERNELS_TMA")
    os.environ["CORDA_KERNELS_TMA"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CORDA_KERNELS_TMA", None)
        else:
            os.environ["CORDA_KERNELS_TMA"] = old


def with_tma_setting(value: str, fn):
    """fn run with CORDA_KERNELS_TMA=value."""

    def run():
        with tma_env(value):
            return fn()

    return run


def tma_possible(t: torch.Tensor) -> bool:
    """Whether the default runs TMA configs for t's device and dtype (sm_90; under the interpreter,
    as =1 would: the CPU smoke runs), else the CORDA_KERNELS_TMA rows are skipped. On newer GPUs the
    default is pointer loads, and =1 would be the only TMA row: set it for the whole run there."""
    from corda_kernels.ops import _backend

    if t.dtype not in (torch.float16, torch.bfloat16):
        return False
    with tma_env("" if t.is_cuda else "1"):
        return _backend.tma_device(t)


SPIN_CYCLES = 2_000_000  # ~1 ms at an H200's 1.98 GHz: more than the host needs to launch one call


def cuda_medians(cands: dict, iters: int, warmup: int = 2, busy_s: float = 0.3) -> dict:
    """Median milliseconds per candidate, each timed with CUDA events, candidates interleaved."""
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    # Autotuning leaves the GPU idle for seconds while kernels compile, and its clocks drop: on the
    # H200 the first shape timed after a compile ran up to 1.8x slow. Keep it busy a while first.
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < busy_s:
        for fn in cands.values():
            fn()
        torch.cuda.synchronize()
    events = {name: [] for name in cands}
    # A kernel of ~0.1 ms launched from Python can take as long to launch as to run: timed on its own,
    # its events would measure the host. A GPU-side spin before each timed call lets the launches
    # queue up behind it, so the events see the GPU's time only.
    spin = getattr(torch.cuda, "_sleep", None)
    for _ in range(iters):
        for name, fn in cands.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if spin is not None:
                spin(SPIN_CYCLES)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    return {name: statistics.median(s.elapsed_time(e) for s, e in ev) for name, ev in events.items()}


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


ERRORS: list[str] = []  # every error row of this run: main() exits 1 if any
MIB = 2**20


def cuda_peak_mib(fn) -> float | None:
    """Peak CUDA memory allocated during one call of ``fn``, above what was allocated just before (MiB).

    None when DEV is not a CUDA device (fn still runs once, so the CPU smoke test walks the same path)
    or when reading the allocator's statistics failed (the traceback is printed; timings are kept)."""
    on_cuda = torch.device(DEV).type == "cuda"
    if not on_cuda:
        fn()
        return None
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del out
    except Exception:  # noqa: BLE001 - a memory figure is not worth the section's timings
        traceback.print_exc()
        return None
    return (peak - before) / MIB


def mib_cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def error_row(ncols: int, where: str, exc: BaseException) -> list[str]:
    ERRORS.append(where)
    msg = f"ERROR in {where}: {type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:300]
    return [msg] + [""] * (ncols - 1)


# ----------------------------------------------------------------------------- (a) covariance
def section_covariance(args) -> str:
    from corda_kernels import ops
    from corda_kernels.ops import covariance as cov_mod

    # The roofline two ways: the datasheet's dense bf16 peak, and what a large bf16 GEMM reaches here.
    pn = args.peak_n
    a = torch.randn(pn, pn, device=DEV, dtype=DTYPE)
    mm_ms = cuda_medians({"mm": lambda a=a: torch.mm(a, a)}, args.iters)["mm"]
    measured = 2 * pn**3 / (mm_ms * 1e-3)
    del a
    header = [
        "d", "rows", "candidate", "ms", "useful TFLOP/s", "% bf16 peak", "% measured mm peak",
        "speed-up vs best fp32-summing torch", "rel err vs fp64",
    ]  # fmt: skip
    rows = []
    has_out_dtype = has_addmm_out_dtype = True
    for d in args.cov_dims:
        for n in args.cov_rows:
            try:
                torch.manual_seed(0)
                x = torch.randn(n, d, device=DEV, dtype=DTYPE)
                acc = torch.zeros(d, d, device=DEV)
                # collect_cov's usual case: a padding mask (a quarter of the rows dropped), its kept-row
                # list built once per batch (ops.KeptRows) as the collector does; flops count kept rows.
                keep = torch.rand(n, device=DEV) >= 0.25
                kept = ops.KeptRows(keep)
                kept.index_and_count()
                cands = {
                    "corda_kernels triangle (triton)": lambda acc=acc, x=x: ops.covariance_update(
                        acc, x, backend="triton"
                    ),
                    "corda_kernels triangle, 25% rows masked (triton)": lambda acc=acc, x=x, k=kept: (
                        ops.covariance_update(acc, x, k, backend="triton")
                    ),
                    "torch addmm, fp32 upcast": lambda acc=acc, x=x: acc.addmm_(x.float().t(), x.float()),
                    "torch mm bf16 full (bf16 out)": lambda x=x: torch.mm(x.t(), x),
                }
                if has_out_dtype:
                    try:
                        torch.mm(x[:16, :16].t(), x[:16, :16], out_dtype=torch.float32)
                        cands["torch mm bf16, out_dtype=fp32 (+ add)"] = lambda acc=acc, x=x: acc.add_(
                            torch.mm(x.t(), x, out_dtype=torch.float32)
                        )
                    except (TypeError, RuntimeError, NotImplementedError):
                        has_out_dtype = False
                if has_addmm_out_dtype:
                    # The baseline: one accumulating GEMM, no fp32 temporary. Whether out= may alias
                    # the input is checked by its error against float64 below.
                    try:
                        probe = torch.zeros(16, 16, device=DEV)
                        torch.addmm(probe, x[:16, :16].t(), x[:16, :16], out_dtype=torch.float32, out=probe)
                        cands["torch addmm bf16, out_dtype=fp32, out=acc"] = lambda acc=acc, x=x: torch.addmm(
                            acc, x.t(), x, out_dtype=torch.float32, out=acc
                        )
                    except (TypeError, RuntimeError, NotImplementedError):
                        has_addmm_out_dtype = False
                tma_names = {}
                if tma_possible(x) and args.tma != "off":
                    # One of the two repeats the default: =1 where the default already reads through
                    # TMA (updates above the threshold on sm_90), else =0. Only the other one is timed.
                    with tma_env(""):  # the default's own size rule
                        default_tma = x.is_cuda and cov_mod._tma_size_ok(n, d)
                    for value in [v for v in TMA_SETTINGS if v != ("1" if default_tma else "0")]:
                        name = f"corda_kernels triangle (triton, CORDA_KERNELS_TMA={value})"
                        tma_names[name] = value
                        cands[name] = with_tma_setting(
                            value, lambda acc=acc, x=x: ops.covariance_update(acc, x, backend="triton")
                        )
                if args.tma == "only":
                    cands = {k: v for k, v in cands.items() if k.startswith("corda_kernels triangle (triton")}
                med = cuda_medians(cands, args.iters)
                # Accuracy on a fresh accumulator (one update), against a float64 Gram matrix.
                ref = x.double().t() @ x.double()
                errs = {}
                acc2 = torch.zeros(d, d, device=DEV)
                ops.covariance_update(acc2, x, backend="triton")
                errs["corda_kernels triangle (triton)"] = (
                    ops.covariance_result(acc2).double() - ref
                ).norm() / ref.norm()
                for name, value in tma_names.items():
                    acc2.zero_()
                    with tma_env(value):
                        ops.covariance_update(acc2, x, backend="triton")
                    errs[name] = (ops.covariance_result(acc2).double() - ref).norm() / ref.norm()
                if has_out_dtype:
                    full = torch.mm(x.t(), x, out_dtype=torch.float32).double()
                    errs["torch mm bf16, out_dtype=fp32 (+ add)"] = (full - ref).norm() / ref.norm()
                if has_addmm_out_dtype:
                    # From a non-zero accumulator: an out= that overwrote its input before reading it would
                    # look right from zeros.
                    start = torch.randn(d, d, device=DEV)
                    acc3 = start.clone()
                    torch.addmm(acc3, x.t(), x, out_dtype=torch.float32, out=acc3)
                    got = acc3.double() - start.double()
                    errs["torch addmm bf16, out_dtype=fp32, out=acc"] = (got - ref).norm() / ref.norm()
                    del acc3, start, got
                xk = x[keep].double()
                ref_kept = xk.t() @ xk
                acc2.zero_()
                ops.covariance_update(acc2, x, kept, backend="triton")
                errs["corda_kernels triangle, 25% rows masked (triton)"] = (
                    ops.covariance_result(acc2).double() - ref_kept
                ).norm() / ref_kept.norm()
                del ref, acc2, xk, ref_kept
                n_kept = int(keep.sum())
                # The baseline: the fastest torch expression that sums in fp32 (a bf16-output mm
                # loses the fp32 sums, so it is shown but not a baseline).
                summing = [ms for name, ms in med.items() if name.startswith("torch") and "bf16 out" not in name]
                best_torch = min(summing) if summing else None
                for name, ms in med.items():
                    flops = (n_kept if "masked" in name else n) * d * (d + 1)
                    tf = flops / (ms * 1e-3)
                    err = f"{float(errs[name]):.1e}" if name in errs else ""
                    ours = name.startswith("corda_kernels") and "masked" not in name
                    vs = f"{best_torch / ms:.2f}x" if ours and best_torch is not None else ""
                    rows.append(
                        [d, n, name, f"{ms:.3f}", f"{tf / 1e12:.1f}", f"{100 * tf / PEAK_BF16:.1f}%",
                         f"{100 * tf / measured:.1f}%", vs, err]
                    )  # fmt: skip
                del x, acc
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - report and go on
                rows.append(error_row(len(header), f"covariance d={d} rows={n}", exc))
                traceback.print_exc()
    title = (
        f"(a) covariance update, bf16 x, fp32 accumulator (bf16 peak {PEAK_BF16 / 1e12:.0f} TFLOP/s datasheet, "
        f"{measured / 1e12:.0f} measured by a {pn}^3 mm; useful flops n·d·(d+1); autotune key d only)"
    )
    return table(title + TMA_TITLE.get(args.tma, ""), header, rows)


# ----------------------------------------------------------------------------- (b) adapter linear
def _lora_case(M: int, D: int, r: int, iters: int, tma: str = "both") -> list[list[str]]:
    import torch.nn as nn
    from peft_layer import peft_lora_linear

    from corda_kernels import ops

    torch.manual_seed(0)
    dev, dt = DEV, DTYPE
    x = torch.randn(M, D, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(M, D, device=dev, dtype=dt)
    base = nn.Linear(D, D, device=dev, dtype=dt).requires_grad_(False)
    W, b = base.weight, base.bias
    A = (torch.randn(r, D, device=dev) / D**0.5).to(dt).requires_grad_()
    B = (torch.randn(D, r, device=dev) * 0.02).to(dt).requires_grad_()
    peft_layer = peft_lora_linear(nn.Linear(D, D, device=dev, dtype=dt), r)
    peft_layer.to(device=dev, dtype=dt)
    with torch.no_grad():
        peft_layer.base_layer.weight.copy_(W)
        peft_layer.base_layer.bias.copy_(b)
        peft_layer.lora_A["default"].weight.copy_(A)
        peft_layer.lora_B["default"].weight.copy_(B)
    scaling = peft_layer.scaling["default"]

    def step(fn):
        def run():
            x.grad = None
            A.grad = B.grad = None
            peft_layer.zero_grad(set_to_none=True)  # else PEFT's own adapters accumulate gradients
            fn().backward(dy)

        return run

    cands = {
        "base nn.Linear (frozen)": step(lambda: base(x)),
        "corda_kernels lora_linear (triton)": step(lambda: ops.lora_linear(x, W, b, A, B, scaling, backend="triton")),
        "corda_kernels lora_linear (torch path)": step(
            lambda: ops.lora_linear(x, W, b, A, B, scaling, backend="torch")
        ),
        "PEFT lora.Linear": step(lambda: peft_layer(x)),
    }
    tma_names = {}
    if tma_possible(x) and tma != "off":
        for value in TMA_SETTINGS:
            name = f"corda_kernels lora_linear (triton, CORDA_KERNELS_TMA={value})"
            tma_names[name] = value
            cands[name] = with_tma_setting(
                value, step(lambda: ops.lora_linear(x, W, b, A, B, scaling, backend="triton"))
            )
    if tma == "only":
        keep = ("base nn.Linear (frozen)", "corda_kernels lora_linear (triton)", *tma_names)
        cands = {k: v for k, v in cands.items() if k in keep}
    med = cuda_medians(cands, iters)

    def clear_grads():
        x.grad = None
        A.grad = B.grad = None
        peft_layer.zero_grad(set_to_none=True)

    peaks = {}
    for name, fn in cands.items():  # one run each, gradients from the timing runs freed first
        clear_grads()
        peaks[name] = cuda_peak_mib(fn)
    clear_grads()
    errs = {}
    with torch.no_grad():
        y_peft = peft_layer(x).double()
    step(lambda: peft_layer(x))()
    dx_peft = x.grad.double()
    for name in ("corda_kernels lora_linear (triton)", *tma_names):
        if name in cands:
            # The output, and dx (=1 differs from the default only in dx's GEMM on sm_90).
            with tma_env(tma_names[name]) if name in tma_names else contextlib.nullcontext():
                with torch.no_grad():
                    y_ours = ops.lora_linear(x, W, b, A, B, scaling, backend="triton").double()
                step(lambda: ops.lora_linear(x, W, b, A, B, scaling, backend="triton"))()
            dx_ours = x.grad.double()
            errs[name] = (
                f"y vs PEFT rel diff {float((y_ours - y_peft).norm() / y_peft.norm()):.1e}, "
                f"dx {float((dx_ours - dx_peft).norm() / dx_peft.norm()):.1e}"
            )
    clear_grads()
    t_base, t_peft = med["base nn.Linear (frozen)"], med.get("PEFT lora.Linear")
    rows = []
    for name, ms in med.items():
        note = errs.get(name, "")
        mem = mib_cell(peaks[name])
        vs_peft = f"{t_peft / ms:.2f}x" if t_peft is not None else ""
        rows.append([M, D, r, name, f"{ms:.3f}", f"{ms / t_base:.3f}x", vs_peft, mem, note])

    # The rank-sized backward products alone (u = dy·B, dB = dyᵀ·s): the fused one-read kernel
    # against two GEMMs over dy. This is the measurement that should set lora.MAX_FUSED_RANK.
    from corda_kernels.ops import lora as lora_mod

    s = torch.randn(M, r, device=dev).to(dt)
    Bd = B.detach()
    pair = {
        "  dy products: fused kernel, one read of dy": lambda: lora_mod._dy_lowrank(dy, Bd, s),
        "  dy products: two GEMMs over dy": lambda: (lora_mod._mm_f32(dy, Bd), lora_mod._mm_f32(dy.t(), s)),
    }
    if tma != "only":  # --tma only: the TMA comparison alone
        pm = cuda_medians(pair, iters)
        pair_peaks = {name: cuda_peak_mib(fn) for name, fn in pair.items()}
        two = pm["  dy products: two GEMMs over dy"]
        used = "fused" if r <= lora_mod.MAX_FUSED_RANK else "two GEMMs"
        for name, ms in pm.items():
            note = f"backward uses: {used} (MAX_FUSED_RANK={lora_mod.MAX_FUSED_RANK})" if "fused" in name else ""
            rows.append(
                [M, D, r, name, f"{ms:.3f}", "", f"{two / ms:.2f}x vs two GEMMs", mib_cell(pair_peaks[name]), note]
            )

    # Where the rest of the time goes: the fused forward GEMM (x·Wᵀ + b + scaling·s·Bᵀ, written
    # once) against cuBLAS's x·Wᵀ + b alone, which is the floor the fused kernel should approach.
    s32 = s.float()
    Wt, Bt = W.detach().t(), Bd.t()
    fwd = {
        "  forward GEMM: fused kernel, adapter in its epilogue": lambda: lora_mod._gemm_lowrank(
            x.detach(), Wt, b, s32, Bt, scaling
        ),
        "  forward GEMM: cuBLAS addmm, no adapter": lambda: torch.addmm(b, x.detach(), Wt),
    }
    if tma_names:  # =1 runs the forward GEMM as the default does
        fwd["  forward GEMM: fused kernel, CORDA_KERNELS_TMA=0"] = with_tma_setting(
            "0", lambda: lora_mod._gemm_lowrank(x.detach(), Wt, b, s32, Bt, scaling)
        )
    fm = cuda_medians(fwd, iters)
    flops = 2.0 * M * D * D
    blas = fm["  forward GEMM: cuBLAS addmm, no adapter"]
    for name, ms in fm.items():
        note = f"{flops / ms / 1e9:.0f} TFLOP/s (x·Wᵀ flops only)"
        rows.append([M, D, r, name, f"{ms:.3f}", "", f"{blas / ms:.2f}x vs cuBLAS", "", note])

    # The input gradient's GEMM alone (dy·W + scaling·u·A, as backward runs it: u in fp32), which no
    # fwd+bwd row isolates; its =1 row decides whether dx's GEMM should read through TMA by default.
    u32 = torch.randn(M, r, device=dev)
    Wd, Ad = W.detach(), A.detach()
    dxg = {
        "  dx GEMM: fused kernel, adapter in its epilogue": lambda: lora_mod._gemm_lowrank(
            dy, Wd, None, u32, Ad, scaling
        ),
        "  dx GEMM: cuBLAS mm, no adapter": lambda: torch.mm(dy, Wd),
    }
    if tma_names:
        dxg["  dx GEMM: fused kernel, CORDA_KERNELS_TMA=1"] = with_tma_setting(
            "1", lambda: lora_mod._gemm_lowrank(dy, Wd, None, u32, Ad, scaling)
        )
    dm = cuda_medians(dxg, iters)
    blas = dm["  dx GEMM: cuBLAS mm, no adapter"]
    for name, ms in dm.items():
        note = f"{flops / ms / 1e9:.0f} TFLOP/s (dy·W flops only)"
        rows.append([M, D, r, name, f"{ms:.3f}", "", f"{blas / ms:.2f}x vs cuBLAS", "", note])
    return rows


def section_lora(args) -> str:
    header = ["M", "K=N", "r", "candidate", "fwd+bwd ms", "time vs base Linear", "speed-up vs PEFT", "peak MiB", "note"]
    rows = []
    for r in args.lora_ranks:
        try:
            rows += _lora_case(args.lora_m, args.lora_d, r, args.iters, args.tma)
        except Exception as exc:  # noqa: BLE001 - report and go on
            rows.append(error_row(len(header), f"adapter r={r}", exc))
            traceback.print_exc()
        torch.cuda.empty_cache()
    title = "(b) adapter linear forward + backward, bf16 (x requires grad, base frozen); peak MiB: one run"
    return table(title + TMA_TITLE.get(args.tma, ""), header, rows)


# ----------------------------------------------------------------------------- (c) end to end
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def section_collect(args) -> str:
    header = ["stage", "seconds (median)", "ratio", "peak MiB (one run)", "note"]
    rows = []
    try:
        from peft import LoraConfig
        from peft.tuners.lora import corda as peft_corda
        from peft.tuners.lora.config import CordaConfig
        from transformers import LlamaConfig, LlamaForCausalLM

        import corda_kernels as ck

        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 128,
            num_key_value_heads=max(1, args.hidden // 512),
            vocab_size=32000,
            max_position_embeddings=max(4096, args.seq),
        )
        with torch.device(DEV):
            model = LlamaForCausalLM(cfg)
        model = model.to(DTYPE).eval()
        g = torch.Generator().manual_seed(0)
        loader = []
        for _ in range(args.seqs // args.batch):
            ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(DEV)
            loader.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        sequences = [row for bt in loader for row in bt["input_ids"]]
        lcfg = LoraConfig(
            r=16,
            lora_alpha=16,
            target_modules=TARGETS,
            init_lora_weights="corda",
            corda_config=CordaConfig(corda_method="kpm"),
        )

        def plain():
            with torch.no_grad():
                for bt in loader:
                    model(**bt, use_cache=False)

        def ours(normalize="mean"):
            return ck.collect_cov(model, loader, normalize=normalize, progress=False)

        def peft_collect():
            def run_model():
                with torch.no_grad():
                    for ids in sequences:
                        model(input_ids=ids.unsqueeze(0), use_cache=False)

            peft_corda.calib_cov_distribution(model, lcfg, run_model, None, None)

        def clear_peft():
            for _, m in peft_corda.target_modules(model, lcfg):
                for attr in ("covariance_matrix", "sample_count"):
                    if hasattr(m, attr):
                        delattr(m, attr)

        def wall(fn):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            return time.perf_counter() - t, out

        # Warm-up (autotuning, cuBLAS heuristics, allocator), then interleaved repeats.
        plain()
        ours()
        peft_collect()
        clear_peft()
        times = {"plain forward (batched)": [], "PEFT collection (1 sequence at a time)": [], "collect_cov": []}
        for _ in range(args.repeats):
            times["plain forward (batched)"].append(wall(plain)[0])
            times["PEFT collection (1 sequence at a time)"].append(wall(peft_collect)[0])
            clear_peft()
            times["collect_cov"].append(wall(ours)[0])
        med = {k: statistics.median(v) for k, v in times.items()}

        # Peak memory of one run each, above what is allocated before it (PEFT's buffers cleared first).
        clear_peft()
        peaks = {"plain forward (batched)": cuda_peak_mib(plain)}
        peaks["PEFT collection (1 sequence at a time)"] = cuda_peak_mib(peft_collect)
        clear_peft()
        peaks["collect_cov"] = cuda_peak_mib(ours)

        # Agreement: our normalize="peft" against PEFT's own matrices, on a few targets.
        note = ""
        try:
            peft_collect()
            theirs = {n: m.covariance_matrix for n, m in peft_corda.target_modules(model, lcfg)}
            mine = ours("peft")
            errs = []
            for name in list(theirs)[:7]:
                c = mine[name].double()
                t = theirs[name].double()
                errs.append(float((c - t).norm() / t.norm()))
            note = f"normalize='peft' vs PEFT's matrices: max rel diff {max(errs):.1e} over {len(errs)} targets"
            clear_peft()
        except Exception as exc:  # noqa: BLE001
            note = f"agreement check failed: {type(exc).__name__}: {exc}"[:200]
        base = med["plain forward (batched)"]
        peft_t = med["PEFT collection (1 sequence at a time)"]
        peft_peak = peaks["PEFT collection (1 sequence at a time)"]
        for name, t in med.items():
            extra = ""
            if name == "collect_cov":
                extra = f"**{peft_t / t:.1f}x faster than PEFT**; {note}"
                if peaks[name] is not None and peft_peak:
                    extra += f"; peak memory {peaks[name] / peft_peak:.2f}x PEFT's"
            rows.append([name, f"{t:.3f}", f"{t / base:.2f}x forward", mib_cell(peaks[name]), extra.replace("|", "/")])
    except Exception as exc:  # noqa: BLE001
        rows.append(error_row(len(header), "collect_cov end to end", exc))
        traceback.print_exc()
    title = (
        f"(c) end to end: Llama hidden={args.hidden} inter={args.intermediate} layers={args.layers}, bf16, "
        f"{args.seqs} sequences x {args.seq} tokens (batches of {args.batch} for ours), median of {args.repeats}"
    )
    return table(title, header, rows)


def autotune_choices(after: str | None = None) -> str:
    """The config each autotuned kernel picked, per tuning key, so one GPU run can inform the tile tables."""
    try:
        from corda_kernels.ops import covariance, lora
    except Exception:  # noqa: BLE001
        return ""
    rows = []
    for name, tuned in (
        ("covariance", getattr(covariance, "_cov_triangle_tuned", None)),
        ("adapter GEMM", getattr(lora, "_gemm_lowrank_tuned", None)),
        ("dy kernel", getattr(lora, "_dy_lowrank_tuned", None)),
    ):
        for key, cfg in sorted(getattr(tuned, "cache", {}).items(), key=str):
            named = dict(zip(tuned.keys, key))
            # Triton appends the arguments' dtypes after the named keys: they tell apart, say, the
            # masked launch (an int32 row list) from the unmasked one at the same D.
            extra = [str(v) for v in key[len(tuned.keys) :]]
            desc = ", ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            desc += f", warps={cfg.num_warps}, stages={cfg.num_stages}"
            shown = ", ".join(f"{k}={v}" for k, v in named.items())
            rows.append([name, shown + (f" ({', '.join(extra)})" if extra else ""), desc])
    if not rows:
        return ""
    title = "autotuner picks (this process" + (f", after section {after})" if after else ")")
    return table(title, ["kernel", "key", "config"], rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--cov-dims", type=int, nargs="+", default=[4096, 11008])
    ap.add_argument("--cov-rows", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--peak-n", type=int, default=8192, help="size of the bf16 mm that measures the peak")
    ap.add_argument("--lora-m", type=int, default=8192)
    ap.add_argument("--lora-d", type=int, default=4096)
    ap.add_argument("--lora-ranks", type=int, nargs="+", default=None, help="default 16 64 128 (--quick: 16)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--tma",
        choices=["off", "both", "only"],
        default="both",
        help="rows with CORDA_KERNELS_TMA=0 and =1 in (a) and (b): none, next to every other row, or with ours alone",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--markdown", default=None, help="also write the report, dated, to this markdown file")
    ap.add_argument("--append", action="store_true", help="append to --markdown (header only if it is new)")
    args = ap.parse_args(argv)
    if args.lora_ranks is None and not args.quick:
        args.lora_ranks = [16, 64, 128]
    if not torch.cuda.is_available():
        print("gpu_bench.py: no CUDA device here; nothing to measure (run it on a GPU machine, see bench/gpu_check.sh)")
        return 0
    if args.quick:
        args.iters, args.cov_dims, args.cov_rows, args.peak_n = 3, [1024], [1024], 1024
        args.lora_m, args.lora_d = 1024, 1024
        args.lora_ranks = args.lora_ranks or [16]  # gpu_check.sh gives each process its rank
        args.hidden, args.intermediate, args.layers, args.seqs, args.seq, args.batch, args.repeats = (
            512, 1376, 2, 8, 256, 4, 1)  # fmt: skip

    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "missing"
    head = f"{torch.cuda.get_device_name()}; torch {torch.__version__}; triton {tv}; CUDA {torch.version.cuda}"
    tma_setting = os.environ.get("CORDA_KERNELS_TMA")
    if tma_setting is not None:  # "by default" rows then run this setting
        head += f"; CORDA_KERNELS_TMA={tma_setting}"
    print(head)
    print()
    fresh = not (args.append and args.markdown and os.path.exists(args.markdown) and os.path.getsize(args.markdown))
    report = ["### bench/gpu_bench.py, " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "", head, ""]
    if not fresh:
        report = []
    with open(args.markdown, "a" if args.append else "w") if args.markdown else contextlib.nullcontext() as md:
        if md is not None and report:
            md.write("\n".join(report) + "\n")
            md.flush()
        sections = {"a": section_covariance, "b": section_lora, "c": section_collect}
        for key in args.sections:
            t = time.perf_counter()
            try:
                text = sections[key](args)
            except Exception as exc:  # noqa: BLE001
                text = table(f"({key})", ["error"], [error_row(1, f"section {key}", exc)])
                traceback.print_exc()
            note = f"(section {key}: {time.perf_counter() - t:.0f} s wall, autotuning and compiles included)"
            picks = autotune_choices(key)
            print(text)
            print(f"\n{note}\n", flush=True)
            if picks:
                print(picks + "\n", flush=True)
            if md is not None:  # written after every section, so a timeout still leaves what was measured
                part = [text.replace("### ", "#### ", 1), "", note, ""]
                if picks:
                    part += [picks.replace("### ", "#### ", 1), ""]
                md.write("\n".join(part) + "\n")
                md.flush()
    if ERRORS:
        print(f"gpu_bench.py: {len(ERRORS)} error row(s): {ERRORS[:5]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
