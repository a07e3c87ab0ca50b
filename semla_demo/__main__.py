"""``python -m semla_demo``: the offline demo (what ``make demo`` runs)."""

import sys

from .pipeline import main

if __name__ == "__main__":  # the world writer's worker processes import this module again
    sys.exit(main())
