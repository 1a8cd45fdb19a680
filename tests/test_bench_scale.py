"""bench/bench_scale.py runs end to end (tiny sizes) and prints its table."""

import importlib.util
from pathlib import Path


def test_bench_scale_smoke(capsys):
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--hidden", "64", "--intermediate", "96", "--layers", "1", "--batches", "2", "--rank", "4"]
    assert mod.main([*args, "--candidates", "2"]) == 0
    out = capsys.readouterr().out
    stages = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert stages[1:] == [
        "plain forward",
        "collect_cov",
        "build_corda kpm r4",
        "merge_corda",
        "collect_cov candidates=2 keep_spectra=True",
        "select_covariances",
        "allocate_ranks budget=1.0",
        "build_corda (CorDA++ ranks)",
    ]
