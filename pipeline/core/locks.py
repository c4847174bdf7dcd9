"""OS file locks: the work dir's while a `run` uses it, the store's (shared by runs, exclusive for gc),
and one per store entry while it is built.

`fcntl.flock` locks belong to the open file, and the kernel drops them when the process dies, so a
kill -9 never leaves a stale lock behind. On NFS (v4, or v3 with lockd) Linux emulates flock with
POSIX byte-range locks, which the server tracks across clients (a shared flock becomes a read lock,
an exclusive one a write lock: both hold between nodes); on Lustre the client must be mounted
with `-o flock` (with `-o localflock` a lock only holds between processes of one node, and gc on
one node could remove an entry a run on another node is about to link). Lock files are never
deleted: a process waiting on an unlinked lock file would hold a lock nobody else can see.

Lock order (every process takes them in this order, and gc takes only the store lock, so no two
processes can wait on each other in a cycle):
  1. `<workdir>/.lock`   exclusive, never waited for (a second run on the work dir exits 2)
  2. `<store>/.lock`     shared by every run for its whole duration; exclusive for gc, which never
                         waits for it (it exits 2 while runs hold it); a run waits while gc holds it
  3. `<store>/<stage>/<fingerprint>.lock`   exclusive, waited for; a run holds at most one at a time
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.core.bounded import read_regular


class Locked(Exception):
    """The lock is held by another process; `holder` says which ("pid 123 on host node7")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def _holder_text() -> str:
    return f"pid {os.getpid()} on host {socket.gethostname()}"


def read_holder(path: Path) -> str:
    try:
        return read_regular(path, 4096).decode(errors="replace").strip() or "an unknown process"
    except OSError:
        return "an unknown process"


@contextlib.contextmanager
def exclusive(path: Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed). Without `wait`, raise Locked at once when
    another process holds it; with `wait`, block until it is free (calling `on_wait(holder)` once)."""
    with _flock(path, fcntl.LOCK_EX, wait=wait, on_wait=on_wait) as fd:
        # Who holds it, for the other process's message; written after locking, so it is ours. Only a
        # courtesy: on a full disk (gc, there to free space) the lock holds without it.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{_holder_text()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield


@contextlib.contextmanager
def shared(path: Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold a shared lock on `path`: any number of processes at once, none while one holds it exclusively.
    Locked / `on_wait` name the exclusive holder (shared holders write nothing: there are many)."""
    with _flock(path, fcntl.LOCK_SH, wait=wait, on_wait=on_wait):
        yield


@contextlib.contextmanager
def _flock(path: Path, operation: int, *, wait: bool, on_wait: Callable[[str], None] | None) -> Iterator[int]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            if not wait:
                raise Locked(holder) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, operation)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def held_by(path: Path) -> str | None:
    """Who holds the lock on `path` now, or None when nobody does (never blocks, never creates it)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_holder(path)
    finally:
        os.close(fd)
    return None
