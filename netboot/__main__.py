"""``python -m netboot`` is the ``netboot`` command."""

import sys

from netboot.cli import main

sys.exit(main())
