"""Atomic writes: a temporary file (or directory) beside the target, then one rename.

Every result, trace, log and checkpoint the lab writes goes through here, so an interrupted write
leaves the previous file intact and never a half-written one. A file is replaced with
``os.replace``; a directory (a checkpoint) is filled beside its target and swapped with it in one
step (``exchange_dirs``), so at every instant the target is the old whole or the new whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable


def _open_under_umask(path: str, mode: int) -> None:
    """``chmod`` to ``mode`` less the user's umask: mkstemp and mkdtemp make 0600 / 0700 (and
    safetensors writes 0600), which would hide a finished result from everyone else."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it over ``path``."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(path))
    os.close(fd)
    try:
        write(tmp)
        _open_under_umask(tmp, 0o666)
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


def atomic_directory(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_dir)`` to fill a temporary directory beside ``path`` (``<name>.tmp-*``),
    then put it in place of ``path``: a rename where ``path`` does not exist, else one exchange,
    after which the previous directory is deleted. An interrupted write leaves ``path`` as it was
    (a killed process also leaves its ``.tmp-`` directory beside it)."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        write(tmp)
        _open_under_umask(tmp, 0o777)
        for fn in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, fn)):
                _open_under_umask(os.path.join(tmp, fn), 0o666)
        if not os.path.exists(path):
            os.rename(tmp, path)
        else:
            exchange_dirs(tmp, path)          # now tmp holds the previous directory
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def exchange_dirs(a: str, b: str) -> None:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE), so that at every
    instant ``b`` is complete, the old one or the new one. Where the call is missing (another
    OS, an old libc, a file system without it) fall back to two renames, with an instant in
    between at which ``b`` does not exist (the old one then sits beside it)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
            return
    backup = tempfile.mkdtemp(prefix=os.path.basename(b) + ".old-", dir=os.path.dirname(b))
    os.rmdir(backup)
    os.rename(b, backup)
    os.rename(a, b)
    os.rename(backup, a)
