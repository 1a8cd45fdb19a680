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


def _compiles_transformers_models() -> bool:
    # transformers 5 calls torch.compiler.is_exporting() inside its models, which torch 2.6 lacks: Dynamo
    # then fails on any transformers model, with or without this package.
    import transformers
    from packaging.version import Version

    return hasattr(torch.compiler, "is_exporting") or Version(transformers.__version__).major < 5


requires_compilable_transformers = pytest.mark.skipif(
    not _compiles_transformers_models(), reason="this transformers calls torch.compiler.is_exporting (torch >= 2.7)"
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
