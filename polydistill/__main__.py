"""``python -m polydistill``: the same command line as ``polydistill``."""

import sys

from polydistill.cluster.cli import main

sys.exit(main())
