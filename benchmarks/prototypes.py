"""Fixes proposed for the pipeline code, prototyped here so the benchmarks can measure them side by
side with the code as it is. Nothing in the pipeline imports this module; each fix is described, with
the file and function to change, in benchmarks/README.md.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np


def npy_read_without_mmap(self, start: int, stop: int) -> np.ndarray:
    """The proposed NpyPool.read: a positional read of rows [start, stop) into a new array, so no page
    of the file stays mapped into the process (the memmap is used for its header: shape, dtype, offset)."""
    mapped = self._images()
    stop = min(max(stop, 0), len(mapped))
    start = min(max(start, 0), stop)
    if mapped.dtype.hasobject or not mapped.flags.c_contiguous:
        return np.ascontiguousarray(mapped[start:stop])
    out = np.empty((stop - start, *mapped.shape[1:]), dtype=mapped.dtype)
    row_bytes = out[:1].nbytes if len(out) else 0
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(self.path, os.O_RDONLY)
    try:
        offset, done = mapped.offset + start * row_bytes, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at byte {offset + done}")
            done += got
    finally:
        os.close(fd)
    return out


@contextlib.contextmanager
def npy_pools_read_without_mmap():
    """Within the block, data.pools.NpyPool.read is npy_read_without_mmap."""
    from data import pools

    original = pools.NpyPool.read
    pools.NpyPool.read = npy_read_without_mmap
    try:
        yield
    finally:
        pools.NpyPool.read = original


class PreadGatherReader:
    """Prototype of a faster PseudoLabelReader.gather for uncompressed chunked images: the file offset of
    every chunk is looked up once, then each requested row is one os.pread (no HDF5 chunk cache)."""

    def __init__(self, reader):
        self.reader = reader
        ds = reader._images
        if ds.chunks is None or ds.compression is not None or ds.chunks[1:] != ds.shape[1:]:
            raise ValueError("PreadGatherReader needs uncompressed chunks of whole rows")
        self.rows_per_chunk = ds.chunks[0]
        self.row_shape, self.row_bytes = ds.shape[1:], int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
        self.dtype, self.length = ds.dtype, ds.shape[0]
        chunks = -(-self.length // self.rows_per_chunk)
        self.chunk_offsets = np.array([ds.id.get_chunk_info_by_coord((c * self.rows_per_chunk,) + (0,) * (ds.ndim - 1))
                                       .byte_offset for c in range(chunks)], dtype=np.int64)
        self.fd = os.open(reader.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.length

    def gather(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices), *self.row_shape), dtype=self.dtype)
        offsets = self.chunk_offsets[indices // self.rows_per_chunk] + (indices % self.rows_per_chunk) * self.row_bytes
        flat = out.reshape(len(indices), -1).view(np.uint8)
        for k, offset in enumerate(offsets.tolist()):
            flat[k] = np.frombuffer(os.pread(self.fd, self.row_bytes, offset), dtype=np.uint8)
        return out

    def close(self) -> None:
        os.close(self.fd)
