"""Atomic file writes: a temporary file beside the target, then ``os.replace``.

Every result, trace and log the lab writes goes through here, so an interrupted write leaves the
previous file intact and never a half-written one. (Checkpoints, being directories, swap a whole
temporary directory instead: ``dsv3lab.checkpoint.save``.)
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it over ``path``."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp's 0600 would hide results from others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes_atomic(path: str, data: bytes) -> str:
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(path, w)


def write_json_atomic(path: str, obj, indent: int | None = 2) -> str:
    return write_bytes_atomic(path, json.dumps(obj, indent=indent, default=str).encode())
