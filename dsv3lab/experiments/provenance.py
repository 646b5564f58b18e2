"""Where a result came from: the commit of the code that produced it, and whether the code differed."""

from __future__ import annotations

import subprocess
from typing import Optional

from dsv3lab.paths import repo_root


def _git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", "-C", repo_root(), *args], capture_output=True, text=True,
                              timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict:
    """The commit the code came from and whether the code (dsv3lab/, kernels/) differed from it."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", "dsv3lab", "kernels") if commit else None
    return dict(commit=commit, dirty=bool(status) if status is not None else None)
