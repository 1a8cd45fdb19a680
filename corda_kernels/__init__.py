"""corda_kernels: fast CorDA / CorDA++ adapter initialization with Triton kernels.

Pipeline: model + loader -> :func:`collect_cov` -> :func:`context_svd` per layer
-> :func:`build_corda` (``CordaLinear`` layers) -> train -> :func:`merge_corda`.
"""

from __future__ import annotations

from . import ops
from .collect import collect_cov
from .covariance import Covariances
from .decompose import Decomposition, context_svd
from .layer import CordaLinear
from .rewrite import build_corda, corda_layers, merge_corda, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "CordaLinear",
    "Covariances",
    "Decomposition",
    "__version__",
    "build_corda",
    "collect_cov",
    "context_svd",
    "corda_layers",
    "merge_corda",
    "ops",
    "trainable_parameters",
]

# CorDA++: compactness-driven covariance selection and rank allocation.
from .allocate import RankAllocation, allocate_ranks  # noqa: E402
from .candidates import CovarianceCandidates  # noqa: E402
from .compactness import compactness  # noqa: E402  (the function shadows the submodule attribute)
from .plot import plot_ranks  # noqa: E402
from .select import select_covariances  # noqa: E402

__all__ += [
    "CovarianceCandidates",
    "RankAllocation",
    "allocate_ranks",
    "compactness",
    "plot_ranks",
    "select_covariances",
]

# Interop: PEFT/transformers export and import.
from .export import from_peft, load_pretrained, save_pretrained, to_lora  # noqa: E402

__all__ += ["from_peft", "load_pretrained", "save_pretrained", "to_lora"]
