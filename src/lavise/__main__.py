"""``python -m lavise`` runs the command line (and so does ``torchrun -m lavise``)."""

import sys

from lavise.cli import main

if __name__ == "__main__":
    sys.exit(main())
