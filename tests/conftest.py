"""Shared test set-up.

Without a GPU the Triton kernels run through Triton's interpreter; that must be
switched on before any kernel is decorated, hence here, before imports.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 is mishandled by the Triton interpreter)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
