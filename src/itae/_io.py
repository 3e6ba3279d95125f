"""Atomic file writes: a file is either absent or complete, even after kill -9.

Write to a fresh temporary sibling (same folder, so the rename is atomic), fsync it, ``os.replace``
it into place, fsync the folder. Files get the permissions of an ordinary ``open(path, "w")``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_PREFIX = ".itae-tmp-"


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A fresh, not yet existing sibling of ``path`` for writing then renaming."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary sibling, fsync, then ``os.replace``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:  # "x": created with the usual permissions, never an existing file
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, errors: str = "strict") -> None:
    """Write ``text`` as UTF-8. ``errors="surrogateescape"`` writes the file-name bytes that are not UTF-8,
    carried in ``str`` as lone surrogates (``os.fsdecode``), back as the bytes they were."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8", errors)))


# How CSV files that hold image ids (file names) are encoded: UTF-8, and a file name that is not valid
# UTF-8 (old disks, archives) as its own bytes, so that ids round-trip exactly.
ID_ERRORS = "surrogateescape"
