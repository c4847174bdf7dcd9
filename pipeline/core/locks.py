"""OS file locks: one per work dir while a `run` uses it, one per store entry while it is built.

`fcntl.flock` locks belong to the open file, and the kernel drops them when the process dies, so a
kill -9 never leaves a stale lock behind. On NFS (v4, or v3 with lockd) Linux emulates flock with
POSIX byte-range locks, which the server tracks across clients; on Lustre the client must be mounted
with `-o flock` (with `-o localflock` a lock only holds between processes of one node).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator


class Locked(Exception):
    """The lock is held by another process; `holder` says which ("pid 123 on host node7")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def _holder_text() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()}"


def read_holder(path: Path) -> str:
    try:
        return Path(path).read_text().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


@contextlib.contextmanager
def exclusive(path: Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed). Without `wait`, raise Locked at once when
    another process holds it; with `wait`, block until it is free (calling `on_wait(holder)` once)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            if not wait:
                raise Locked(holder) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        # Who holds it, for the other process's message; written after locking, so it is ours.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{_holder_text()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def held_by(path: Path) -> str | None:
    """Who holds the lock on `path` now, or None when nobody does (never blocks, never creates it)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path)
    finally:
        os.close(fd)
    return None
