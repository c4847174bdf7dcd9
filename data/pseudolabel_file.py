"""The `pseudolabels.h5` format (schema_version 1): its layout, validator and reader (the writer:
data/pseudolabel_writer.py).

Layout (see DESIGN.md): `images` uint8 (N, H, W, C) chunked by rows, `labels` int64 (N,), `confidence`
float32 (N,), `pool_index` int64 (N,), optional `logits` float16 (N, K). Attributes: `schema_version`,
`num_classes`, `class_names`, `pool_name`, `pool_fingerprint`, `teacher_fingerprint`, plus the writer's
bookkeeping `rows_written`, `pool_rows_done` and `complete` (0 while being written, 1 once finished).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from pipeline.core.errors import UserError

SCHEMA_VERSION = 1

# Attributes the caller must supply: validation refuses a file without them, so refuse to write one.
REQUIRED_ATTRS = ("class_names", "pool_name", "pool_fingerprint", "teacher_fingerprint")

# Target bytes per images chunk: big enough that a sequential read is a few large I/Os, small enough
# that a random gather touching one row of a chunk does not drag in much (3 MiB = 1024 CIFAR rows).
_CHUNK_BYTES = 3 << 20
# Chunk cache per open file: holds a few image chunks, so appends smaller than a chunk do not
# read-modify-write a compressed chunk on every call.
CACHE_BYTES = 32 << 20

DTYPES = {"images": np.uint8, "labels": np.int64, "confidence": np.float32, "pool_index": np.int64,
           "logits": np.float16}


def default_rows_per_chunk(image_shape: tuple[int, int, int]) -> int:
    """Rows per images chunk so that a chunk is about 3 MiB and, where that moves it by at most 10%,
    a whole number of 4 KiB blocks, which the writer can write with O_DIRECT (1024 rows for 32x32x3, 4096 for
    28x28x1)."""
    row_bytes = max(1, int(np.prod(image_shape)))
    rows = max(1, _CHUNK_BYTES // row_bytes)
    step = 4096 // math.gcd(row_bytes, 4096)  # the fewest rows that fill whole blocks
    rounded = round(rows / step) * step
    return rounded if rounded and abs(rounded - rows) <= rows // 10 else rows


def to_python(value: Any) -> Any:
    """h5py attribute values -> plain Python (numpy scalars, arrays of str, bytes), for dicts and compares."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs_dict(f: h5py.File) -> dict:
    return {k: to_python(v) for k, v in f.attrs.items()}


def _fail(path: str, problem: str, fix: str | None = None) -> UserError:
    fix = fix or ("Rerun the pseudolabel stage with --force to regenerate it, or point pool.path at a "
                  "valid pseudolabels.h5.")
    return UserError(f"{path}: {problem}. {fix}")


def validate_pseudolabels(path) -> dict:
    """Check that `path` is a complete, well-formed schema-1 `pseudolabels.h5`; return its attrs.

    Every failure is a UserError naming the file and the fix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise _fail(path, "pseudo-label file does not exist")
    if not h5py.is_hdf5(path):
        raise _fail(path, "not an HDF5 file or corrupt")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise _fail(path, f"not an HDF5 file or corrupt ({e})") from None
    try:
        with f:
            return _check_open_file(path, f)
    except OSError as e:  # a truncated file can open and then fail on reading data
        raise _fail(path, f"not an HDF5 file or corrupt ({e})") from None


def _check_open_file(path: str, f: h5py.File) -> dict:
    attrs = _attrs_dict(f)
    version = attrs.get("schema_version")
    if version is None:
        raise _fail(path, "has no schema_version attribute, so it is not a pseudolabels.h5 written by rst-mart")
    if version != SCHEMA_VERSION:
        raise _fail(path, f"has schema_version {version} but this rst-mart reads schema_version "
                          f"{SCHEMA_VERSION}")
    for key in ("num_classes", *REQUIRED_ATTRS):
        if key not in attrs:
            raise _fail(path, f"lacks the {key!r} attribute")

    required = ("images", "labels", "confidence", "pool_index")
    for name in (*required, "logits"):
        if name not in f:
            if name == "logits":
                continue
            raise _fail(path, f"lacks the {name!r} dataset")
        ds = f[name]
        if not isinstance(ds, h5py.Dataset) or ds.dtype != DTYPES[name]:
            dtype = getattr(ds, "dtype", "a group")
            raise _fail(path, f"dataset {name!r} is {dtype}, expected {np.dtype(DTYPES[name])}")
    n = f["images"].shape[0]
    if f["images"].ndim != 4:
        raise _fail(path, f"dataset 'images' has shape {f['images'].shape}, expected (N, H, W, C)")
    num_classes = int(attrs["num_classes"])
    for name in ("labels", "confidence", "pool_index"):
        if f[name].shape != (n,):
            raise _fail(path, f"dataset {name!r} has shape {f[name].shape}, expected ({n},) like 'images'")
    if "logits" in f and f["logits"].shape != (n, num_classes):
        raise _fail(path, f"dataset 'logits' has shape {f['logits'].shape}, expected ({n}, {num_classes})")

    if attrs.get("complete") != 1:
        raise _fail(path, "is incomplete (the pseudolabel stage was interrupted before finishing)",
                    "Rerun the pseudolabel stage: it resumes where it stopped (or use --force to start over).")
    labels = f["labels"][()]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise _fail(path, f"has labels outside [0, {num_classes}) (min {labels.min()}, max {labels.max()})")
    return attrs

class PseudoLabelReader:
    """Lazily opened: constructing it opens nothing; the h5py.File is opened on first access."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._file: h5py.File | None = None
        self._columns: dict[str, np.ndarray] = {}
        self._raw: tuple[int, np.ndarray] | None = None  # (fd, byte offset of each chunk)

    def _h5(self) -> h5py.File:
        if self._file is None:
            self._file = h5py.File(self.path, "r", rdcc_nbytes=CACHE_BYTES, rdcc_nslots=10007)
            self._raw = None
        return self._file

    def _raw_rows(self) -> tuple[int, np.ndarray] | None:
        """(fd, chunk byte offsets) when rows can be read straight from the file, else None.

        Uncompressed chunks of whole rows are plain bytes on disk: one os.pread per row beats going
        through HDF5's chunk cache, which reads a whole ~3 MiB chunk to return one 3 KiB row (measured:
        ~60K vs ~2.6K rows/s for random gathers). Compressed files take the HDF5 path.
        """
        ds = self._images
        if self._raw is None:
            if ds.chunks is None or ds.compression is not None or tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):
                self._raw = (-1, np.empty(0, np.int64))
            else:
                rows_per_chunk = ds.chunks[0]
                starts = range(0, ds.shape[0], rows_per_chunk)
                offsets = [ds.id.get_chunk_info_by_coord((r,) + (0,) * (ds.ndim - 1)).byte_offset for r in starts]
                self._raw = (os.open(self.path, os.O_RDONLY), np.asarray(offsets, dtype=np.int64))
        return None if self._raw[0] < 0 else self._raw

    @property
    def _images(self) -> h5py.Dataset:
        return self._h5()["images"]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            if self._raw is not None and self._raw[0] >= 0:
                os.close(self._raw[0])
        self._file = None
        self._raw = None

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def _column(self, name: str) -> np.ndarray:
        # Small (8 bytes a row): read whole once, then served from memory.
        if name not in self._columns:
            self._columns[name] = self._h5()[name][()]
        return self._columns[name]

    @property
    def labels(self) -> np.ndarray:
        return self._column("labels")

    @property
    def confidence(self) -> np.ndarray:
        return self._column("confidence")

    @property
    def pool_index(self) -> np.ndarray:
        return self._column("pool_index")

    @property
    def attrs(self) -> dict:
        return _attrs_dict(self._h5())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self._images.shape[1:])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in one contiguous read."""
        return self._images[start:stop]

    def gather(self, indices: np.ndarray) -> np.ndarray:
        """Rows at arbitrary `indices` (any order, duplicates allowed), one read per touched chunk.

        h5py fancy indexing wants increasing unique indices (and mishandles duplicates), and one
        h5py call per sample is slow, so: dedupe and sort, read each touched chunk's needed rows in
        one call, then put rows back in the caller's order with the inverse index.
        """
        ds = self._images
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = ds.shape[0]
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"{self.path}: gather indices out of range [0, {n})")
        if not indices.size:
            return np.empty((0, *ds.shape[1:]), dtype=ds.dtype)
        raw = self._raw_rows()
        if raw is not None:
            fd, chunk_offsets = raw
            rows_per_chunk = ds.chunks[0]
            row_bytes = int(np.prod(ds.shape[1:])) * ds.dtype.itemsize
            offsets = chunk_offsets[indices // rows_per_chunk] + (indices % rows_per_chunk) * row_bytes
            out = np.empty((len(indices), *ds.shape[1:]), dtype=ds.dtype)
            flat = out.reshape(len(indices), -1).view(np.uint8)
            for k, offset in enumerate(offsets.tolist()):
                flat[k] = np.frombuffer(os.pread(fd, row_bytes, offset), dtype=np.uint8)
            return out
        unique, inverse = np.unique(indices, return_inverse=True)
        out = np.empty((len(unique), *ds.shape[1:]), dtype=ds.dtype)
        rows_per_chunk = ds.chunks[0] if ds.chunks else default_rows_per_chunk(ds.shape[1:])
        chunk_of = unique // rows_per_chunk
        # Boundaries of the runs of unique indices that fall in the same chunk.
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(unique)]):
            rows = unique[lo:hi]
            first, last = int(rows[0]), int(rows[-1])
            span = last - first + 1
            if span <= 2 * len(rows) + 8:
                # Dense: one contiguous block read, then pick the rows out in memory.
                out[lo:hi] = ds[first:last + 1][rows - first]
            else:
                # Sparse within the chunk: one selection read of just these rows (sorted, unique).
                out[lo:hi] = ds[rows]
        return out[inverse.reshape(-1)]

    def load_images(self) -> np.ndarray:
        """The whole images dataset in memory (for pools that fit)."""
        return self._images[()]


# Rows of the 1-D columns read at a time (about 20 MiB for labels + confidence + pool_index).
COLUMN_BLOCK_ROWS = 1 << 20


def iter_column_blocks(path, names: tuple[str, ...] | list[str],
                       rows_per_block: int = COLUMN_BLOCK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The columns `names` (of labels, confidence, pool_index, logits) of a pseudolabels.h5, a block of
    rows at a time as {name: array}, in row order: memory does not grow with the pool. A reader of a
    file it did not just write validates it first (validate_pseudolabels)."""
    unknown = [n for n in names if n not in DTYPES or n == "images"]
    if unknown:
        raise ValueError(f"iter_column_blocks reads the 1-D columns and logits, not {unknown}")
    with h5py.File(path, "r") as f:
        rows = f["labels"].shape[0]
        for start in range(0, rows, rows_per_block):
            yield {name: f[name][start:start + rows_per_block] for name in names}


def pseudolabel_summary(path, *, confidence_bins: int = 20, block_rows: int = COLUMN_BLOCK_ROWS) -> dict[str, Any]:
    """Per-class counts and mean confidence and a confidence histogram, from the `labels` and
    `confidence` columns read a block at a time (a pool of 50M rows would be 600 MB at once)."""
    with h5py.File(path, "r") as f:
        attrs = _attrs_dict(f)
    names = [str(n) for n in attrs.get("class_names", [])]
    counts = np.zeros(max(int(attrs.get("num_classes", 0)), len(names)), dtype=np.int64)
    confidence_sums = np.zeros(len(counts))
    edges = np.linspace(0.0, 1.0, confidence_bins + 1)
    histogram = np.zeros(confidence_bins, dtype=np.int64)
    rows = 0
    for block in iter_column_blocks(path, ("labels", "confidence"), rows_per_block=block_rows):
        labels, confidence = block["labels"].astype(np.int64), block["confidence"].astype(np.float64)
        size = max(len(counts), int(labels.max(initial=-1)) + 1)
        counts = np.pad(counts, (0, size - len(counts)))
        confidence_sums = np.pad(confidence_sums, (0, size - len(confidence_sums)))
        counts += np.bincount(labels, minlength=size)
        confidence_sums += np.bincount(labels, weights=confidence, minlength=size)
        histogram += np.histogram(confidence, bins=edges)[0]
        rows += len(labels)
    names += [str(k) for k in range(len(names), len(counts))]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, confidence_sums / np.maximum(counts, 1), np.nan)
    return {"rows": rows, "class_names": names, "counts": counts, "mean_confidence": mean_confidence,
            "confidence_histogram": histogram, "confidence_edges": edges}
