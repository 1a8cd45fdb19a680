"""Hot-path ops. Each op has a Triton kernel for CUDA and a plain-torch reference.

``backend="auto"`` picks Triton for CUDA tensors and torch otherwise;
``CORDA_KERNELS_BACKEND=torch`` forces the reference everywhere.
"""

from .covariance import KeptRows, covariance_reference, covariance_result, covariance_update
from .lora import lora_linear, lora_linear_reference

__all__ = [
    "KeptRows",
    "covariance_reference",
    "covariance_result",
    "covariance_update",
    "lora_linear",
    "lora_linear_reference",
]
