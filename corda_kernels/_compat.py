"""Differences between the transformers releases the package supports."""

from __future__ import annotations

import functools


@functools.cache
def dtype_kwarg() -> str:
    """The ``from_pretrained`` keyword for the weights' dtype: ``dtype`` from transformers 4.56
    on (``torch_dtype`` is deprecated there), ``torch_dtype`` before (which rejects ``dtype``)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def from_pretrained_kwargs(kwargs: dict) -> dict:
    """``kwargs`` with a ``dtype``/``torch_dtype`` entry under the name this transformers takes."""
    key = dtype_kwarg()
    other = "torch_dtype" if key == "dtype" else "dtype"
    if other in kwargs and key in kwargs:
        raise ValueError("give the model's dtype once, as dtype= or torch_dtype=, not both")
    if other in kwargs:
        kwargs = dict(kwargs)
        kwargs[key] = kwargs.pop(other)
    return kwargs
