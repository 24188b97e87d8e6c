"""``python -m asg``: the ``asg`` command (and ``torchrun -m asg``, which needs a module to run)."""

import sys

from asg.cli import main

if __name__ == "__main__":
    sys.exit(main())
