"""Optional native extensions live in csrc/; none is built until a benchmark earns it.

Metadata is in pyproject.toml; this file exists so that a future C++/CUDA
extension has one place to be declared (torch.utils.cpp_extension), as torchao does.
"""

from setuptools import setup

setup()
