"""A pool stored as numbered HDF5 shard files, as the generate stage writes it, and read back as one pool.

Each shard `shard-00000.h5`, `shard-00001.h5`, ... holds rows [index * shard_size, ...) of the pool in the
format `pool.provider = "hdf5"` reads: `images` uint8 (N, H, W, C) and, for images made for a class,
`labels` int64 (N,) (the pool's provided labels), plus attributes saying where the rows come from. A shard
is written under a temporary name and renamed when complete, so a shard file that exists is whole: resuming
after a kill means making the shards that do not exist yet. h5py is imported where a file is opened: the
generate stage's declaration names its shards with this module, and `status` imports no HDF5.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data.pool_files import ConcatenatedParts, Hdf5Part
from pipeline.core.atomic import atomic_path
from pipeline.core.errors import storage_errors

SHARD_PATTERN = "shard-{:05d}.h5"
# stage.json records every shard (~150 bytes each) and is read up to 1 MiB (pipeline/store.py), and names keep
# five digits, so sorting them by name is sorting them by index.
MAX_SHARDS = 4096


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def shard_count(n: int, shard_size: int) -> int:
    return -(-n // shard_size)


def shard_rows(index: int, n: int, shard_size: int) -> tuple[int, int]:
    """The pool rows [start, stop) of shard `index`."""
    return index * shard_size, min((index + 1) * shard_size, n)


class ShardWriter:
    """Rows written in any order into a preallocated shard under a temporary name; `done()` renames it."""

    def __init__(self, tmp_path: Path, rows: int, image_shape: tuple[int, int, int], with_labels: bool, attrs: dict):
        import h5py

        self._file = h5py.File(tmp_path, "w")
        self._images = self._file.create_dataset("images", (rows, *image_shape), dtype=np.uint8)
        self._labels = self._file.create_dataset("labels", (rows,), dtype=np.int64) if with_labels else None
        for key, value in attrs.items():
            self._file.attrs[key] = value

    def write(self, offset: int, images: np.ndarray, labels: np.ndarray | None) -> None:
        self._images[offset:offset + len(images)] = images
        if self._labels is not None:
            self._labels[offset:offset + len(images)] = labels

    def close(self) -> None:
        self._file.flush()
        self._file.close()

    def abandon(self) -> None:
        """Close after a failure without HDF5 writing again: after a failed write it retries its dirty metadata
        on every close and at exit, where a second failure crashes the process (data/pseudolabel_writer.py).
        Pointing its descriptor at /dev/null lets the close succeed; the temporary file is deleted anyway."""
        with contextlib.suppress(Exception):  # a file already closed has no descriptor to redirect
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, int(self._file.id.get_vfd_handle()))
            finally:
                os.close(null)
        with contextlib.suppress(Exception):
            self._file.close()


@contextlib.contextmanager
def write_shard(path: Path, rows: int, image_shape: tuple[int, int, int], *, with_labels: bool,
                attrs: dict) -> Iterator[ShardWriter]:
    """A ShardWriter whose file becomes `path` (fsynced, renamed) only when the block exits cleanly; a kill
    leaves a `.shard-*.tmp` file that `remove_leftovers` clears."""
    # A full disk while creating, writing or closing the file is the user's paragraph naming `path`; other
    # errors (the sampler's) pass through storage_errors unchanged.
    with atomic_path(path) as tmp, storage_errors(path):
        writer = ShardWriter(tmp, rows, image_shape, with_labels, attrs)
        try:
            yield writer
            writer.close()
        except BaseException:
            writer.abandon()
            raise


def remove_leftovers(directory: Path) -> None:
    """Temporary shard files of killed writers (`.shard-00003.h5.<random>.tmp`)."""
    for leftover in Path(directory).glob(".shard-*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()


def shard_paths(directory: Path) -> list[Path]:
    """The shard files of a finished pool, in pool order."""
    return sorted(Path(directory).glob("shard-[0-9][0-9][0-9][0-9][0-9].h5"))


class ShardedPool:
    """The shards of a finished generate entry read as one pool (the pool provider protocol of data/pools.py).

    Its fingerprint is the generate stage's: the entry is content-addressed by it. Provided labels are the
    conditioning classes when the images were made for classes, else None."""

    provider = "generate"

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self._fingerprint = Path(directory), fingerprint
        self.paths = shard_paths(directory)
        if not self.paths:
            raise FileNotFoundError(f"{directory} holds no shard-*.h5 files")
        self.name = f"generate:{os.fspath(directory)}"
        self._parts: ConcatenatedParts | None = None

    def _opened(self) -> ConcatenatedParts:
        if self._parts is None:
            self._parts = ConcatenatedParts([Hdf5Part(p, "images", "") for p in self.paths], self.provider)
        return self._parts

    def __len__(self) -> int:
        return len(self._opened())

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._opened().read(start, stop)

    def fingerprint(self) -> str:
        return self._fingerprint

    def provided_labels(self) -> np.ndarray | None:
        import h5py

        labels = []
        for path in self.paths:
            with h5py.File(path, "r") as f:
                if "labels" not in f:
                    return None
                labels.append(f["labels"][()])
        return np.concatenate(labels).astype(np.int64)
