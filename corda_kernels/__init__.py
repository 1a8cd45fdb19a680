"""corda_kernels: fast CorDA / CorDA++ adapter initialization with Triton kernels.

Pipeline: model + loader -> :func:`collect_cov` -> :func:`context_svd` per layer
-> :func:`build_corda` (``CordaLinear`` layers) -> train -> :func:`merge_corda`.
CorDA++ adds candidate covariances (``collect_cov(candidates=N)``),
:func:`select_covariances` and :func:`allocate_ranks`; :func:`save_pretrained`
and friends speak PEFT's format.
"""

from __future__ import annotations

from . import ops

# CorDA++: compactness-driven covariance selection and rank allocation.
from .allocate import RankAllocation, allocate_ranks
from .candidates import CovarianceCandidates
from .collect import collect_cov

# The function shadows the submodule attribute: reach the module via importlib.
from .compactness import compactness
from .covariance import Covariances
from .decompose import Decomposition, context_svd

# Interop: PEFT/transformers export and import.
from .export import LoraAdapter, from_peft, load_pretrained, save_pretrained, to_lora
from .layer import CordaLinear
from .plot import plot_ranks
from .rewrite import build_corda, corda_layers, merge_corda, trainable_parameters
from .select import select_covariances

__version__ = "0.1.0"

__all__ = [
    "CordaLinear",
    "CovarianceCandidates",
    "Covariances",
    "Decomposition",
    "LoraAdapter",
    "RankAllocation",
    "__version__",
    "allocate_ranks",
    "build_corda",
    "collect_cov",
    "compactness",
    "context_svd",
    "corda_layers",
    "from_peft",
    "load_pretrained",
    "merge_corda",
    "ops",
    "plot_ranks",
    "save_pretrained",
    "select_covariances",
    "to_lora",
    "trainable_parameters",
]
