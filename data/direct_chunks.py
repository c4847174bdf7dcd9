"""Whole chunks of a preallocated, uncompressed HDF5 dataset written with O_DIRECT from a background thread.

Why: the pseudolabel stage writes a copy of every pool image (1.5 GB for 500,000 32x32x3 images). Written
through the page cache, the kernel copies each 3 MiB chunk on the cores the teacher's forward needs,
whichever thread issues the write: on a 2-core EPYC the forwards ran 7-10% slower with a buffered 3 MiB
write after each 1,024-image batch, 2% slower with the same write as O_DIRECT from a thread (the device
copies it). Such a chunk is plain bytes at a fixed offset (allocated when the dataset was created), so it
needs no HDF5 to write, as PseudoLabelReader needs none to read it.

O_DIRECT wants the buffer, the offset and the length aligned (4 KiB covers every common device): the
buffers here are page-aligned mmaps, the writer asks HDF5 to align large allocations, and a chunk that is
not aligned anyway (a file from before, a row size with no aligned chunk near 3 MiB) is the caller's to
write another way. Where the filesystem refuses O_DIRECT (opening, or the first write, fails with EINVAL)
the same bytes go through the buffered descriptor from the same thread.
"""
from __future__ import annotations

import collections
import errno
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

ALIGNMENT = 4096
# Bytes of chunks waiting for the device: enough to keep it busy while the next forward runs, small beside
# the stage's own memory.
MAX_IN_FLIGHT_BYTES = 32 << 20


def aligned(offset: int, size: int) -> bool:
    return offset % ALIGNMENT == 0 and size % ALIGNMENT == 0


class DirectChunkWrites:
    """Queue whole chunks for O_DIRECT writes on `submit` (a one-thread executor's, shared with the fsyncs so
    that an fsync submitted after a chunk returns only once that chunk is written). A failed write is kept
    and raised by `raise_failure`, `wait` and every later `write`."""

    def __init__(self, direct_fd: int, buffered_fd: int, submit: Callable[..., Future]):
        self._direct_fd, self._buffered_fd, self._submit = direct_fd, buffered_fd, submit
        self._fd = direct_fd  # the one writes use: the buffered one once O_DIRECT has been refused
        self._in_flight: collections.deque[tuple[Future, mmap.mmap]] = collections.deque()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._failure: OSError | None = None

    @classmethod
    def open(cls, path: str, buffered_fd: int, submit: Callable[..., Future]) -> DirectChunkWrites | None:
        """None where this platform or filesystem has no O_DIRECT (macOS, Windows, some network mounts)."""
        if not hasattr(os, "O_DIRECT") or buffered_fd < 0:
            return None
        try:
            direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        return cls(direct_fd, buffered_fd, submit)

    def write(self, rows: np.ndarray, offset: int) -> None:
        """Copy `rows` (a whole chunk, uint8, C-contiguous) into an aligned buffer and queue its write at `offset`."""
        self.raise_failure()
        size = rows.nbytes
        buffer = self._buffer(size)
        np.frombuffer(buffer, np.uint8)[:] = rows.reshape(-1)
        self._in_flight.append((self._submit(self._pwrite, buffer, offset), buffer))

    def _buffer(self, size: int) -> mmap.mmap:
        while self._in_flight and self._in_flight[0][0].done():
            self._recycle()
        free = self._free.setdefault(size, [])
        if not free and self._in_flight and len(self._in_flight) * size >= max(MAX_IN_FLIGHT_BYTES, 2 * size):
            self._recycle()  # waits for the oldest write
        return free.pop() if free else mmap.mmap(-1, size)  # anonymous maps are page-aligned

    def _recycle(self) -> None:
        future, buffer = self._in_flight.popleft()
        future.result()
        self._free.setdefault(len(buffer), []).append(buffer)

    def _pwrite(self, buffer: mmap.mmap, offset: int) -> None:
        """On the writer's thread."""
        if self._failure is not None:
            return  # the rows after a failed write are redone by the resume anyway
        view, done = memoryview(buffer), 0
        try:
            while done < len(view):
                try:
                    written = os.pwrite(self._fd, view[done:], offset + done)
                except OSError as e:
                    if e.errno != errno.EINVAL or self._fd == self._buffered_fd:
                        raise
                    self._fd = self._buffered_fd  # O_DIRECT refused here: buffered from now on
                    continue
                if written == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += written  # a short write goes on; what stopped it (ENOSPC...) is raised by the next
        except OSError as e:
            self._failure = e
        finally:
            view.release()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def wait(self) -> None:
        """Every queued write done; raises the first that failed."""
        while self._in_flight:
            self._recycle()
        self.raise_failure()

    def close(self) -> None:
        """After the executor has finished its work (no write may still be running)."""
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = self._fd = -1
        self._in_flight.clear()
        self._free.clear()
