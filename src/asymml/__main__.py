"""``python -m asymml``: the ``asymml`` command (what ``torchrun ... -m asymml train`` runs on each rank)."""

import sys

from asymml.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
