"""examples/finetune.py runs end to end (small settings) and all of its checks pass."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"


def test_finetune_example(tmp_path):
    cmd = [sys.executable, str(EXAMPLE), "--hidden", "64", "--layers", "2", "--vocab", "256", "--seq-len", "16"]
    cmd += ["--steps", "4", "--compile", "aot_eager", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr[-3000:]
    for check in (
        "gradient checkpointing recomputes",
        "gradient checkpointing: equal",
        "torch.compile(aot_eager",
        "optimizer state reloaded",
        "resumed training",
    ):
        assert f"[ok] {check}" in out, out
    assert "OK: all checks passed" in out
    assert (tmp_path / "optimizer.pt").exists() and (tmp_path / "model" / "adapter" / "adapter_config.json").exists()
