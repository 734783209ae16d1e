"""``python -m tests.fuzz``: see :mod:`tests.fuzz.runner`."""

import sys

from .runner import main

sys.exit(main())
