"""Where the checkout is: the one definition of the repository root.

The lab reads and writes beside its code (``data/lab-model``, ``data/results``, ``results/``), so
the root is where this package sits, not the working directory a command was started from.
"""

from __future__ import annotations

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_root() -> str:
    """The checkout this package was imported from (the folder holding ``dsv3lab/``)."""
    return REPO_ROOT


def repo_relative(path: str) -> str:
    """``path`` relative to the checkout when it lies inside it (what a message should print),
    else unchanged."""
    full = os.path.abspath(path)
    return os.path.relpath(full, REPO_ROOT) if full.startswith(REPO_ROOT + os.sep) else path
