"""`python -m deepnav ...` is `deepnav ...` (and `torchrun ... -m deepnav ...` runs it in every process)."""

import sys

from deepnav.cli import main

if __name__ == "__main__":
    sys.exit(main())
