"""bench/gpu_bench.py on the CPU, tiny sizes: the one-shot GPU script must not die of a Python error.

A lent GPU is rare and short, so every section of the script is driven here
first: the Triton ops through the interpreter (fp32), CUDA timing replaced by a
wall clock. Only that the sections run and fill their tables is checked; the
numbers mean nothing on a CPU.
"""

import argparse
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))


def _wall_medians(cands, iters, warmup=1):
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    out = {}
    for name, fn in cands.items():
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        out[name] = statistics.median(ts)
    return out


@pytest.fixture
def gpu_bench(monkeypatch):
    import gpu_bench as gb

    if not torch.cuda.is_available():
        monkeypatch.setattr(gb, "DEV", "cpu")
        monkeypatch.setattr(gb, "DTYPE", torch.float32)  # the interpreter mishandles bf16
        monkeypatch.setattr(gb, "cuda_medians", _wall_medians)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: None)
    return gb


def tiny_args():
    return argparse.Namespace(
        iters=1, cov_dims=[40], cov_rows=[33], peak_n=64, lora_m=40, lora_d=48, lora_ranks=[3, 16],
        hidden=128, intermediate=344, layers=2, seqs=4, seq=16, batch=2, repeats=1, tma="both",
    )  # fmt: skip


def _check(text, expected_rows):
    assert "ERROR" not in text, text
    body = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(body) == expected_rows, text
    return body


def test_covariance_section(gpu_bench):
    rows = _check(gpu_bench.section_covariance(tiny_args()), 4)  # no out_dtype mm on the CPU
    assert any("triangle (triton)" in r for r in rows)
    masked = [r for r in rows if "rows masked" in r]
    assert len(masked) == 1 and float(masked[0].split("|")[-2]) < 1e-5  # its error against fp64 over kept rows
    # Ours against the fastest torch expression that sums in fp32 (not the bf16-output mm).
    cells = {c[3].strip(): (float(c[4]), c[8].strip()) for c in (r.split("|") for r in rows)}
    best = min(ms for name, (ms, _) in cells.items() if name.startswith("torch") and "bf16 out" not in name)
    ms, vs = cells["corda_kernels triangle (triton)"]
    want = best / ms  # from the table's rounded ms: equal up to that rounding
    assert vs.endswith("x") and abs(float(vs[:-1]) - want) <= 0.05 * want + 0.01
    assert all(v == "" for name, (_, v) in cells.items() if name != "corda_kernels triangle (triton)")


def test_adapter_section(gpu_bench):
    # (4 candidates + 2 dy-product rows + 2 forward-GEMM rows + 2 dx-GEMM rows) x 2 ranks
    rows = _check(gpu_bench.section_lora(tiny_args()), 20)
    assert sum("PEFT lora.Linear" in r for r in rows) == 2
    assert sum("backward uses" in r for r in rows) == 2
    assert sum("vs cuBLAS" in r and "TFLOP/s" in r for r in rows) == 8
    assert sum("dx GEMM" in r and "(dy·W flops only)" in r for r in rows) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="an interpreter check; on a GPU the sections run for real")
def test_tma_rows_in_fp16(gpu_bench, monkeypatch):
    # The CORDA_KERNELS_TMA=0 and =1 rows exist for 16-bit operands only: fp16 here (the interpreter mishandles
    # bf16). This checks the bench's wiring only: under the interpreter each autotuner holds one pointer
    # config, so no TMA kernel runs here (tests/test_gpu_tiles.py checks their arithmetic).
    from corda_kernels.ops._backend import tensor_descriptor_class

    if tensor_descriptor_class() is None:
        pytest.skip("this Triton has no TMA descriptors")
    monkeypatch.setattr(gpu_bench, "DTYPE", torch.float16)
    args = tiny_args()
    args.cov_dims, args.lora_ranks = [48], [3]
    # Off a GPU the default reads no TMA, so =0 would repeat it: only =1 is timed beside it.
    cov = _check(gpu_bench.section_covariance(args), 5)
    tma = [r for r in cov if "CORDA_KERNELS_TMA=" in r]
    assert len(tma) == 1 and "TMA=1" in tma[0] and float(tma[0].split("|")[-2]) < 1e-2  # fp16 rounding, vs fp64
    lora = _check(gpu_bench.section_lora(args), 14)
    assert sum("CORDA_KERNELS_TMA=0" in r for r in lora) == 2 and sum("CORDA_KERNELS_TMA=1" in r for r in lora) == 2
    assert sum("dx GEMM: fused kernel, CORDA_KERNELS_TMA=1" in r for r in lora) == 1
    # Each of ours is checked against PEFT twice: its output and its input gradient.
    checked = [r for r in lora if "y vs PEFT rel diff" in r]
    assert len(checked) == 3 and all(float(r.split("dx ")[1].split()[0]) < 1e-2 for r in checked)
    # gpu_check.sh's split: the established rows without the =0 / =1 ones, and ours by default, =0 and =1 apart.
    args.tma = "off"
    assert not any("TMA" in r for r in _check(gpu_bench.section_covariance(args), 4))
    assert not any("TMA" in r for r in _check(gpu_bench.section_lora(args), 10))
    args.tma = "only"
    cov = _check(gpu_bench.section_covariance(args), 2)
    assert all("corda_kernels triangle (triton" in r for r in cov)
    lora = _check(gpu_bench.section_lora(args), 10)  # base, ours by default, =0, =1; 3 forward-, 3 dx-GEMM rows
    assert sum("CORDA_KERNELS_TMA=0" in r for r in lora) == 2 and not any("PEFT lora" in r for r in lora)


def test_end_to_end_section(gpu_bench):
    rows = _check(gpu_bench.section_collect(tiny_args()), 3)
    ours = next(r for r in rows if r.startswith("| collect_cov"))
    assert "faster than PEFT" in ours and "max rel diff" in ours


def test_main_writes_the_dated_markdown_report(gpu_bench, monkeypatch, tmp_path):
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "CPU smoke run")
    out = tmp_path / "RESULTS-gpu.md"
    small = "--iters 1 --cov-dims 40 --cov-rows 33 --lora-m 40 --lora-d 48 --lora-ranks 3 --hidden 128"
    small += " --intermediate 344 --layers 2 --seqs 4 --seq 16 --batch 2 --repeats 1"
    assert gpu_bench.main([*small.split(), "--markdown", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("### bench/gpu_bench.py, 20")
    assert "ERROR" not in text
    for title in ("#### (a) covariance update", "#### (b) adapter linear", "#### (c) end to end"):
        assert title in text


def test_sections_appended_from_separate_runs_and_errors_set_the_exit_code(gpu_bench, monkeypatch, tmp_path):
    # gpu_check.sh runs one process per section, appending to one report: one header, every
    # section, and a failing section turns into an error row and exit code 1 without losing the rest.
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "CPU smoke run")
    monkeypatch.setattr(gpu_bench, "ERRORS", [])

    def broken(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(gpu_bench, "section_lora", broken)
    out = tmp_path / "RESULTS-gpu.md"
    small = "--iters 1 --cov-dims 40 --cov-rows 33 --hidden 128 --intermediate 344 --layers 2 --seqs 4 --seq 16"
    small += " --batch 2 --repeats 1"
    md = ["--markdown", str(out), "--append"]
    assert gpu_bench.main([*small.split(), "--sections", "a", *md]) == 0
    assert gpu_bench.main([*small.split(), "--sections", "b", *md]) == 1
    text = out.read_text()
    assert text.count("### bench/gpu_bench.py, 20") == 1
    assert "#### (a) covariance update" in text
    assert "ERROR in section b: RuntimeError: CUDA error" in text
    assert "(section b:" in text


def test_autotune_picks_are_reported(gpu_bench, monkeypatch):
    from corda_kernels.ops import lora

    tuned = lora._gemm_lowrank_tuned
    key = (8192, 4096, 4096, 16, True, False, 1, 1, "torch.bfloat16")
    cfg = lora._gemm_config(128, 256, 64, 8, 3, tma=True)
    monkeypatch.setattr(tuned, "cache", {key: cfg})
    text = gpu_bench.autotune_choices("b")
    assert text.splitlines()[0] == "### autotuner picks (this process, after section b)"
    row = next(line for line in text.splitlines() if line.startswith("| adapter GEMM"))
    assert "M_BUCKET=8192" in row and "BLOCK_RANK=16" in row and "TMA_OK=1 (torch.bfloat16)" in row
    assert row.endswith("GROUP_M=8, USE_TMA=True, PERSISTENT=False, warps=8, stages=3 |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_to_pass_without_cuda(tmp_path):
    # Without this, every test would pass through the interpreter and the one device run read as green.
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")
    env = {**os.environ, "OUT": str(tmp_path), "PY": sys.executable}
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "FATAL: torch sees no CUDA device" in done.stdout
    assert not (tmp_path / "gpu_pytest.log").exists()


def test_gpu_check_tile_groups_cover_every_tile_test_once():
    # The tile tests run in three groups named by node id; a test left out of all three would
    # never run on a GPU, and one named twice would cost its compiles twice inside the time cap.
    import ast
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    script = open(os.path.join(root, "bench", "gpu_check.sh")).read()
    named = re.findall(r"\$T::(test_\w+)", script)
    tree = ast.parse(open(os.path.join(root, "tests", "test_gpu_tiles.py")).read())
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    assert sorted(named) == sorted(defined)


def _dry_run_gpu_check(tmp_path, **env_extra):
    """gpu_check.sh with a stand-in python that records its arguments (a GPU machine, as far as the
    script can tell): the pytest and gpu_bench.py command lines it would run, in order."""
    import stat
    import subprocess

    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_python"
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{calls}"\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_check.sh")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": str(fake), **env_extra}
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = calls.read_text().splitlines()
    pytest_runs = [line for line in lines if line.startswith("-m pytest")]
    bench_runs = [
        line.split("--markdown")[0].split("gpu_bench.py ")[1].strip() for line in lines if "gpu_bench.py" in line
    ]
    return pytest_runs, bench_runs


def test_gpu_check_runs_every_part_by_default(tmp_path):
    pytest_runs, bench_runs = _dry_run_gpu_check(tmp_path)
    assert len(pytest_runs) == 8 and sum("tests/test_gpu_tiles.py::" in r for r in pytest_runs) == 3
    assert bench_runs == [
        "--sections a --tma off",
        "--sections b --tma off --lora-ranks 16",
        "--sections b --tma off --lora-ranks 64",
        "--sections b --tma off --lora-ranks 128",
        "--sections c --tma off",
        "--sections a --tma only",
        "--sections b --tma only --lora-ranks 16",
    ]


def test_gpu_check_subsets(tmp_path):
    pytest_runs, bench_runs = _dry_run_gpu_check(
        tmp_path, GPU_CHECK_TESTS="tiles_tma", GPU_CHECK_BENCH="b64_tma:150 b_tma b:30", GPU_CHECK_TEST_LIMIT="5"
    )
    assert len(pytest_runs) == 1 and "test_adapter_gemm_every_tma_tile" in pytest_runs[0]
    assert bench_runs == [
        "--sections b --tma only --lora-ranks 64",
        "--sections b --tma only",
        "--sections b --tma off",
    ]
    (tmp_path / "none").mkdir()
    assert _dry_run_gpu_check(tmp_path / "none", GPU_CHECK_TESTS="", GPU_CHECK_BENCH="") == ([], [])
