"""``python -m uniap ...``: the ``uniap`` command line (see :mod:`uniap.cli`)."""

import sys

from uniap.cli import main

sys.exit(main())
