"""``python -m dsv3lab``: the ``dsv3lab`` command (``dsv3lab/cli/``)."""

import sys

from dsv3lab.cli import main

sys.exit(main())
