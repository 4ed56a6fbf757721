"""``python -m tokenloom`` == the ``tokenloom`` command (torchrun needs the module form)."""

import sys

from tokenloom.cli import main

if __name__ == "__main__":
    sys.exit(main())
