"""Reading a small file that something else may have put there: never a FIFO or a device, never unbounded.

A config file, a `stage.json`, a registry record: each is a few KiB. `open()` on a FIFO blocks until
a writer appears, and `read()` on /dev/zero never ends, so a mistaken path (or a record naming
`../../dev/zero`) would hang a command holding a lock, or fill the memory. Opening with O_NONBLOCK
never waits, and `fstat` on the open descriptor (not the path, which could change in between) says
whether it is a regular file before a byte is read.
"""
from __future__ import annotations

import os
import stat


class NotRegularFile(OSError):
    """The path is a FIFO, a device, a socket or a directory; `kind` says which."""

    def __init__(self, path, kind: str):
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


class TooLarge(OSError):
    """The file is over the limit; `size` is what it holds (at least limit + 1)."""

    def __init__(self, path, size: int, limit: int):
        super().__init__(f"{path} holds {size} bytes, over the {limit}-byte limit")
        self.size, self.limit = size, limit


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def open_regular(path, *, follow_symlinks: bool = True) -> tuple[int, os.stat_result]:
    """An O_RDONLY descriptor of `path` and its fstat, or NotRegularFile (the descriptor closed)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if not follow_symlinks and os.path.islink(path):
            raise NotRegularFile(path, "a symbolic link") from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotRegularFile(path, file_kind(st.st_mode))
    # Regular files ignore O_NONBLOCK; reads stay ordinary blocking reads.
    return fd, st


def read_regular(path, limit_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file of at most `limit_bytes`; NotRegularFile, TooLarge or OSError otherwise."""
    fd, st = open_regular(path, follow_symlinks=follow_symlinks)
    try:
        if st.st_size > limit_bytes:
            raise TooLarge(path, st.st_size, limit_bytes)
        chunks, total = [], 0
        while total <= limit_bytes:  # the file may grow while we read: stop one byte past the limit
            chunk = os.read(fd, limit_bytes + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit_bytes:
            raise TooLarge(path, total, limit_bytes)
        return b"".join(chunks)
    finally:
        os.close(fd)
