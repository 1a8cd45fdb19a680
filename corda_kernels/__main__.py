"""``python -m corda_kernels``: the ``corda-kernels`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
