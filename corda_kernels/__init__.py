"""corda_kernels."""
