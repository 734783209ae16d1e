"""``python -m fusedconv ...``: the same as the ``fusedconv`` command."""

import sys

from fusedconv.cli import main

if __name__ == "__main__":
    sys.exit(main())
