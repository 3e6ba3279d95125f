"""A folder lock, so that two runs never write into the same output folder at once.

The lock is an OS file lock (``filelock``) on ``FOLDER/.itae.lock``: the OS releases it when its process
ends, even after kill -9, so a lock left by a killed run never blocks the next one. Beside it,
``FOLDER/.itae.lock.owner`` names the holder (pid, host, command, start time): the lock itself cannot
say who holds it, and a user refused by it needs to know which process to wait for or stop. An owner
file whose process no longer holds the lock is stale; the next run takes the lock over and says so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from itae.errors import FolderInUseError

from ._io import atomic_write_text

log = logging.getLogger("itae")

LOCK_FILE = ".itae.lock"
OWNER_FILE = ".itae.lock.owner"


def read_owner(folder: str | os.PathLike) -> dict | None:
    """What the owner file of ``folder`` says (pid, host, command, started), or None."""
    try:
        data = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextmanager
def folder_lock(folder: str | os.PathLike, command: str = "itae") -> Iterator[Path]:
    """Hold ``folder``'s lock for the block, or raise ``FolderInUseError`` at once naming the holder."""
    folder = Path(folder)
    lock = FileLock(folder / LOCK_FILE, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        owner = read_owner(folder) or {}
        who = f"pid {owner['pid']}" if "pid" in owner else "another process"
        if owner.get("host") not in (None, socket.gethostname()):
            who += f" on {owner['host']}"
        what = f" ({owner['command']}, started {owner.get('started', '?')})" if owner.get("command") else ""
        raise FolderInUseError(
            f"output folder {str(folder)!r} is in use by {who}{what}; wait for it to finish, stop it, or "
            "choose another folder"
        ) from None
    try:
        stale = read_owner(folder)
        if stale is not None:  # we hold the lock, so whoever wrote this is gone
            log.warning("itae: taking over the lock of %s, left by pid %s (%s), which is no longer running",
                        folder, stale.get("pid", "?"), stale.get("command", "?"))
        atomic_write_text(folder / OWNER_FILE, json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }) + "\n")
        yield folder
    finally:
        try:
            (folder / OWNER_FILE).unlink(missing_ok=True)
        finally:
            lock.release()
