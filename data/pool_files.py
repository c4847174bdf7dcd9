"""Pool files read in place: naming the parts, reading one part's rows, and many parts as one pool.

A part is one file's image array, opened from its header alone: `shape`, `dtype`, `read(start, stop)`
returning a fresh C-contiguous array of just those rows, and `labels()` (the labels stored with it,
or None). No part holds its images in memory, so memory per process does not grow with the pool.
"""
from __future__ import annotations

import bisect
import glob
import os
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np

from data.npz_members import NpzMember, locate_member, npz_keys, open_archive, read_npy_header
from pipeline.core.errors import UserError

# --- naming the parts ------------------------------------------------------------------------------

def resolve_pool_paths(path, provider: str, key: str = "pool.path") -> list[Path]:
    """The files `path` (the config's `key`) names, in pool order: a path, a glob (sorted), or a list of either."""
    entries = [path] if isinstance(path, (str, os.PathLike)) else path
    named = isinstance(entries, (list, tuple)) and entries and all(isinstance(e, (str, os.PathLike)) for e in entries)
    if not named:
        raise UserError(f"{provider} pool: {key} = {path!r} names no file; set it to the pool's file, a glob "
                        "such as \"pool/part-*.npz\", or a list of files read in order.")
    files: list[Path] = []
    for entry in map(os.fspath, entries):
        if not entry:
            raise UserError(f"{provider} pool: {key} is empty; set it to the pool's file.")
        if glob.has_magic(entry):
            matched = sorted(Path(p) for p in glob.glob(entry) if Path(p).is_file())
            if not matched:
                raise UserError(f"{provider} pool: {key} = {entry!r} matches no file (relative paths start at "
                                f"{Path.cwd()}); fix the pattern or list the files.")
            files += matched
        elif not Path(entry).exists():
            raise UserError(f"{provider} pool: {entry} does not exist; set {key} to the pool's file.")
        elif not Path(entry).is_file():
            raise UserError(f"{provider} pool: {entry} is not a file; set {key} to the pool's file (or a glob of "
                            "its parts).")
        else:
            files.append(Path(entry))
    seen: set[Path] = set()
    for file in files:
        if file.resolve() in seen:
            raise UserError(f"{provider} pool: {key} names {file} twice, so its images would be used twice; "
                            "list each part once.")
        seen.add(file.resolve())
    return files


# --- one part --------------------------------------------------------------------------------------

def _read_exact(f, buffer: memoryview, path: Path) -> None:
    filled = 0
    while filled < len(buffer):
        count = f.readinto(buffer[filled:])
        if not count:
            raise UserError(f"{path} ended early: it is truncated; copy or download it again.")
        filled += count


def _empty_rows(count: int, shape: tuple, dtype: np.dtype) -> tuple[np.ndarray, memoryview]:
    rows = np.empty((count, *shape[1:]), dtype)
    return rows, memoryview(rows.reshape(-1).view(np.uint8))


class RawArrayPart:
    """An array stored uncompressed at `offset` in a file (.npy, or an npz member written by np.savez).

    Rows are read with plain file reads into fresh arrays rather than sliced from a memory map: a map
    keeps every page it touched mapped into the process, so resident memory would grow with the pool
    (2.7x peak RSS at 500K vs 50K images, measured with benchmarks/bench_memory.py)."""

    def __init__(self, path: Path, offset: int, shape: tuple, dtype: np.dtype, fortran_order: bool, labels=None):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, dtype
        self.fortran_order = fortran_order
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._labels = labels  # callable -> array, or None
        available, needed = path.stat().st_size - offset, shape[0] * self.row_bytes
        if available < needed:
            raise UserError(f"{path} is truncated: its header describes {shape} {dtype} ({needed} bytes of data) "
                            f"but only {max(available, 0)} bytes follow the header; copy or download it again.")

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.fortran_order:  # rows are scattered through the file: rare, read through a map
            mapped = np.memmap(self.path, self.dtype, "r", self.offset, self.shape, order="F")
            return np.ascontiguousarray(mapped[start:stop])
        rows, buffer = _empty_rows(stop - start, self.shape, self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + start * self.row_bytes)
            _read_exact(f, buffer, self.path)
        return rows

    def labels(self) -> np.ndarray | None:
        return self._labels() if self._labels else None


class DeflatedMemberPart:
    """An npz member written by np.savez_compressed, decompressed as a stream, never whole.

    Reads in increasing row order (what pseudo-labeling does, each rank within its own shard) continue
    the stream where the last read stopped. Any other read seeks: forward by decompressing and dropping
    the rows in between, backward by restarting from the member's first byte, so random access costs up
    to a decompression of the whole member; convert such a pool to .npy for random reads."""

    def __init__(self, member: NpzMember, labels=None):
        self.path, self.member = member.path, member.name
        self.shape, self.dtype = member.header.shape, member.header.dtype
        self.fortran_order = member.header.fortran_order
        self.data_start = member.header.header_bytes
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._labels = labels
        self._stream = None
        self._lock = threading.Lock()  # one stream position: one reader at a time

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.fortran_order:
            raise UserError(f"{self.path} (member {self.member}) is a Fortran-order compressed array, which cannot "
                            "be streamed by rows; re-save it with np.savez(out, image=np.ascontiguousarray(images)).")
        rows, buffer = _empty_rows(stop - start, self.shape, self.dtype)
        with self._lock:
            try:
                if self._stream is None:
                    self._stream = zipfile.ZipFile(self.path).open(self.member)
                position = self.data_start + start * self.row_bytes
                if self._stream.tell() != position:
                    self._stream.seek(position)
                _read_exact(self._stream, buffer, self.path)
            except (zlib.error, zipfile.BadZipFile, EOFError, OSError) as e:
                self._stream = None
                raise UserError(f"{self.path} (member {self.member}) cannot be decompressed ({e}): the file is damaged "
                                "or truncated; copy or download it again.") from None
        return rows

    def labels(self) -> np.ndarray | None:
        return self._labels() if self._labels else None


def open_npy_part(path: Path, labels=None) -> RawArrayPart:
    """An .npy file's array; `labels`, if given, is a callable returning the labels that go with it."""
    with open(path, "rb") as f:
        header = read_npy_header(f, str(path))
    return RawArrayPart(path, header.header_bytes, header.shape, header.dtype, header.fortran_order, labels)


def open_npz_part(path: Path, image_key: str, label_key: str) -> RawArrayPart | DeflatedMemberPart:
    with open_archive(path) as archive:
        keys = npz_keys(archive)
        if image_key not in keys:
            raise UserError(f"{path} has no array {image_key!r}; it holds {', '.join(keys) or 'nothing'}. Set "
                            "pool.image_key to the one with the images.")
        member = locate_member(path, image_key, archive)
    labels = (lambda: _npz_array(path, label_key)) if label_key in keys else None
    if member.compressed:
        return DeflatedMemberPart(member, labels)
    header = member.header
    return RawArrayPart(path, member.data_offset, header.shape, header.dtype, header.fortran_order, labels)


def _npz_array(path: Path, key: str) -> np.ndarray:
    """One (small) member read whole: labels are 8 bytes per image against 3,072 for a 32x32x3 image."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]
    except (ValueError, OSError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: member {key!r} cannot be read ({e}); the file is damaged or holds pickled "
                        "objects.") from None


class Hdf5Part:
    """A dataset of images in an HDF5 file, read slice by slice."""

    def __init__(self, path: Path, dataset: str, labels_dataset: str):
        import h5py

        if not h5py.is_hdf5(path):
            raise UserError(f"{path} is not an HDF5 file; check pool.path or pool.provider.")
        try:
            h5 = h5py.File(path, "r")
        except OSError as e:
            raise UserError(f"{path} cannot be opened as HDF5 ({e}); the file is corrupt or truncated: copy it "
                            "again.") from None
        present = []
        h5.visititems(lambda name, obj: present.append(name) if isinstance(obj, h5py.Dataset) else None)
        if dataset not in present:
            h5.close()
            raise UserError(f"{path} has no dataset {dataset!r} (datasets present: {', '.join(present) or 'none'}); "
                            "set pool.dataset to the one that holds the images (N, H, W, C).")
        if labels_dataset and labels_dataset not in present:
            h5.close()
            raise UserError(f"{path} has no dataset {labels_dataset!r} (datasets present: {', '.join(present)}); "
                            "fix pool.labels_dataset or remove it.")
        self.path, self._images = path, h5[dataset]
        self.shape, self.dtype = self._images.shape, self._images.dtype
        # Without an explicit labels_dataset, a `labels` vector matching the images (pseudolabels.h5) is used.
        auto = "labels" in present and h5["labels"].shape == self.shape[:1]
        self._labels_name = labels_dataset or ("labels" if auto else "")

    def read(self, start: int, stop: int) -> np.ndarray:
        try:
            return np.ascontiguousarray(self._images[start:stop])
        except OSError as e:
            raise UserError(f"{self.path}: rows {start}-{stop} cannot be read ({e}); the file is corrupt or truncated: "
                            "copy it again.") from None

    def labels(self) -> np.ndarray | None:
        return self._images.file[self._labels_name][()] if self._labels_name else None


# --- many parts as one ----------------------------------------------------------------------------

class ConcatenatedParts:
    """Parts read as one array in order; all must share one row shape and dtype."""

    def __init__(self, parts: list, provider: str):
        first = parts[0]
        for part in parts:
            if len(part.shape) < 1:
                raise UserError(f"{part.path} holds a single value, not an array of images; check pool.path.")
            if part.shape[1:] != first.shape[1:] or part.dtype != first.dtype:
                raise UserError(
                    f"{provider} pool: {part.path} holds {part.dtype} images of shape {tuple(part.shape[1:])} but "
                    f"{first.path} holds {first.dtype} images of shape {tuple(first.shape[1:])}; all parts of a pool "
                    "must share one image shape and dtype: convert the odd part or drop it from pool.path."
                )
        self.parts = parts
        self.ends = np.cumsum([part.shape[0] for part in parts]).tolist()
        self.row_shape, self.dtype = tuple(first.shape[1:]), first.dtype

    def __len__(self) -> int:
        return self.ends[-1]

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(max(stop, 0), len(self))
        start = min(max(start, 0), stop)
        pieces = []
        index = bisect.bisect_right(self.ends, start)  # the first part that ends after `start`
        while start < stop:
            part_start = self.ends[index - 1] if index else 0
            take = min(stop, self.ends[index])
            pieces.append(self.parts[index].read(start - part_start, take - part_start))
            start, index = take, index + 1
        if not pieces:
            return np.empty((0, *self.row_shape), self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def labels(self) -> np.ndarray | None:
        """The parts' labels end to end, or None unless every part has them."""
        labels = [part.labels() for part in self.parts]
        if any(lab is None for lab in labels):
            return None
        return labels[0] if len(labels) == 1 else np.concatenate([np.asarray(lab) for lab in labels])
