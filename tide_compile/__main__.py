"""``python -m tide_compile``: the same as the ``tide-compile`` command."""

import sys

from .cli import main

sys.exit(main())
