"""The shims that let older Triton releases build and interpret the kernels without a GPU.

The dev set's Triton (3.8) needs neither, so these tests pin the shims themselves; the
whole suite was run on Triton 3.2 and 3.6 with `make compat-torch` (README, Development).
"""

import sys
import types

import pytest

triton = pytest.importorskip("triton")

from corda_kernels.ops import _backend  # noqa: E402
from corda_kernels.ops import covariance as cov_mod  # noqa: E402
from corda_kernels.ops import lora as lora_mod  # noqa: E402

TUNED = [cov_mod._cov_triangle_tuned, lora_mod._gemm_lowrank_tuned, lora_mod._dy_lowrank_tuned]


def _benchmarker(tuned):
    # Triton 3.2-3.3 keep it as do_bench, later releases as _do_bench behind a property.
    return tuned.__dict__.get("_do_bench", tuned.__dict__.get("do_bench"))


@pytest.mark.parametrize("tuned", TUNED, ids=lambda t: t.fn.__name__)
def test_autotuners_look_the_driver_up_only_when_they_tune(tuned):
    # Triton 3.2/3.3 otherwise ask the GPU driver at construction: import failed without a GPU.
    assert _benchmarker(tuned) is _backend.deferred_benchmarker


def test_a_decorator_that_asks_the_driver_at_once_is_bypassed(monkeypatch):
    # Triton 3.2's decorator drops do_bench and asks the driver when it builds the autotuner.
    def eager_decorator(**options):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(triton, "autotune", eager_decorator)
    configs = [triton.Config({"BLOCK_D": 32, "WIDE": 1, "BLOCK_R": 32}, num_warps=4, num_stages=1)]
    tuned = _backend.autotune(cov_mod._cov_triangle_kernel, configs=configs, key=["D"], restore_value=["acc_ptr"])
    assert tuned.configs == configs and list(tuned.keys) == ["D"]
    assert tuned.fn is cov_mod._cov_triangle_kernel
    assert _benchmarker(tuned) is _backend.deferred_benchmarker


def test_the_fallback_refuses_options_it_cannot_pass_on(monkeypatch):
    def eager_decorator(**options):
        raise RuntimeError("0 active drivers ([]). There should only be one.")

    monkeypatch.setattr(triton, "autotune", eager_decorator)
    with pytest.raises(TypeError, match="pre_hook"):
        _backend.autotune(cov_mod._cov_triangle_kernel, configs=[], key=["D"], pre_hook=lambda *a, **k: None)


def test_other_decorator_errors_are_not_hidden(monkeypatch):
    def broken(**options):
        raise RuntimeError("something else")

    monkeypatch.setattr(triton, "autotune", broken)
    with pytest.raises(RuntimeError, match="something else"):
        _backend.autotune(cov_mod._cov_triangle_kernel, configs=[], key=["D"])


def test_old_interpreter_is_told_to_drop_every_config_option(monkeypatch):
    # Triton 3.2's interpreter drops only the launch options in its RESERVED_KWS list.
    fake = types.SimpleNamespace(RESERVED_KWS=["num_warps", "num_stages", "num_ctas", "grid", "maxnreg"])
    monkeypatch.setattr(triton.runtime, "interpreter", fake, raising=False)
    monkeypatch.setitem(sys.modules, "triton.runtime.interpreter", fake)
    _backend._interpreter_accepts_config_options()
    _backend._interpreter_accepts_config_options()  # idempotent
    names = fake.RESERVED_KWS
    assert len(names) == len(set(names))
    for name in ("num_buffers_warp_spec", "num_consumer_groups", "reg_dec_producer", "reg_inc_consumer"):
        assert name in names
