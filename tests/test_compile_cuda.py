"""torch.compile of a model holding CordaLinear layers on CUDA, where their forward runs the Triton kernels.

On the CPU the layers run the torch reference, which examples/finetune.py compiles with
fullgraph=True in CI. On CUDA the forward launches autotuned Triton kernels from inside a
custom autograd Function; whether Dynamo traces them or breaks the graph around them, a user's
plain ``torch.compile(model)`` must still give eager's outputs and gradients. Run by
bench/gpu_check.sh.
"""

import pytest
import torch
from conftest import CUDA
from torch import nn

import corda_kernels as ck

pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the Triton path)")


class _Block(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_model_matches_eager(dtype):
    torch.manual_seed(0)
    model = _Block().cuda().to(dtype)
    calib = [torch.randn(4, 64, 256, device="cuda", dtype=dtype) for _ in range(2)]
    covs = ck.collect_cov(model, calib, targets=["up", "down"], progress=False)
    ck.build_corda(model, covs, rank=8, mode="ipm")
    x = torch.randn(3, 50, 256, device="cuda", dtype=dtype)

    def step(m):
        for p in m.parameters():
            p.grad = None
        y = m(x)
        y.float().square().mean().backward()
        return [y.detach()] + [p.grad.detach().clone() for p in m.parameters() if p.requires_grad]

    eager = step(model)
    compiled = step(torch.compile(model))
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for a, b in zip(eager, compiled):
        # Relative to eager's: torch 2.11 once gave compiled Functions all-zero gradients.
        assert a.abs().max() > 0
        assert ((a.double() - b.double()).norm() / a.double().norm()).item() < tol
