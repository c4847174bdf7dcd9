"""The `pseudolabels.h5` format (schema_version 1): its resumable writer, validator and reader, in one place.

Layout (see DESIGN.md): `images` uint8 (N, H, W, C) chunked by rows, `labels` int64 (N,), `confidence`
float32 (N,), `pool_index` int64 (N,), optional `logits` float16 (N, K). Attributes: `schema_version`,
`num_classes`, `class_names`, `pool_name`, `pool_fingerprint`, `teacher_fingerprint`, plus the writer's
bookkeeping `rows_written`, `pool_rows_done` and `complete` (0 while being written, 1 once finished).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterator

import h5py
import numpy as np

from pipeline.core.errors import UserError, storage_error

SCHEMA_VERSION = 1

# Attributes the caller must supply: validation refuses a file without them, so refuse to write one.
REQUIRED_ATTRS = ("class_names", "pool_name", "pool_fingerprint", "teacher_fingerprint")
# Attributes the writer owns: a caller passing them would silently fight the bookkeeping.
_BOOKKEEPING_ATTRS = ("rows_written", "pool_rows_done", "complete")

# Target bytes per images chunk: big enough that a sequential read is a few large I/Os, small enough
# that a random gather touching one row of a chunk does not drag in much (3 MiB = 1024 CIFAR rows).
_CHUNK_BYTES = 3 << 20
# 1-D columns are read whole, so their chunks only need to be large enough to keep metadata small.
_COLUMN_CHUNK_ROWS = 1 << 16
# Chunk cache per open file: holds a few image chunks, so appends smaller than a chunk do not
# read-modify-write a compressed chunk on every call.
_CACHE_BYTES = 32 << 20

_DTYPES = {"images": np.uint8, "labels": np.int64, "confidence": np.float32, "pool_index": np.int64,
           "logits": np.float16}


def default_rows_per_chunk(image_shape: tuple[int, int, int]) -> int:
    """Rows per images chunk so that a chunk is about 3 MiB (1024 rows for 32x32x3)."""
    row_bytes = int(np.prod(image_shape))
    return max(1, _CHUNK_BYTES // max(1, row_bytes))


def _to_python(value: Any) -> Any:
    """h5py attribute values -> plain Python (numpy scalars, arrays of str, bytes), for dicts and compares."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _attrs_dict(f: h5py.File) -> dict:
    return {k: _to_python(v) for k, v in f.attrs.items()}


class PseudoLabelWriter:
    """Preallocated, chunked, resumable writer. Rows are appended in pool order (only the kept rows).

    If `path` holds an incomplete file of ours written for the same pool and teacher (same
    `pool_fingerprint`, `teacher_fingerprint`, image shape, capacity, `num_classes`, `save_logits`),
    it is reopened and writing resumes at its `rows_written`/`pool_rows_done` (`resumed` is True);
    anything else at `path` (finished, foreign, different teacher) is replaced, and so is a file that
    cannot be read or claims rows it does not hold (`discarded` says why, and `log` is told).

    A full disk or I/O error while writing raises a UserError naming the file and the free space. The
    file then keeps what the last commit made durable: a commit flushes and fsyncs the rows before it
    records them in `rows_written`, so the recorded progress never runs ahead of the disk. With
    `commit_seconds` = 0 every append commits; with more, an append commits only when that long has
    passed since the last commit (and `finish` always does), so a kill redoes at most that much work
    and a fast producer does not pay a flush and an fsync per block (`rows_written`/`pool_rows_done`
    here count every appended row; the file's attributes, what a resume reads, count the committed).
    """

    def __init__(self, path, *, capacity: int, image_shape: tuple[int, int, int], num_classes: int,
                 attrs: dict, save_logits: bool = False, rows_per_chunk: int | None = None,
                 compression: str | None = None, commit_seconds: float = 0.0, log: Callable[[str], None] = print):
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"PseudoLabelWriter: attrs lacks {missing}")
        for key in _BOOKKEEPING_ATTRS:
            if key in attrs:
                raise ValueError(f"PseudoLabelWriter: attrs[{key!r}] is maintained by the writer")
        for key, ours in (("schema_version", SCHEMA_VERSION), ("num_classes", num_classes)):
            if key in attrs and _to_python(attrs[key]) != ours:
                raise ValueError(f"PseudoLabelWriter: attrs[{key!r}]={attrs[key]!r} contradicts {ours!r}")
        self.path = os.fspath(path)
        self.capacity = int(capacity)
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self.save_logits = bool(save_logits)
        self.rows_per_chunk = int(rows_per_chunk or default_rows_per_chunk(self.image_shape))
        self._file: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._fd = -1  # the HDF5 driver's descriptor, for fsync and for abandoning a failed file
        self.commit_seconds = float(commit_seconds)
        self._committed_at = time.monotonic()

        self.discarded: str | None = None
        self.resumed = self._check_resumable(attrs)
        if self.resumed:
            with self._storage_failures():
                self._attach(self._open("r+"))
            self.rows_written = int(self._file.attrs["rows_written"])
            self.pool_rows_done = int(self._file.attrs["pool_rows_done"])
        else:
            if self.discarded:
                log(f"  {self.path} was left unreadable or inconsistent ({self.discarded}); discarding it "
                    "and starting that file over")
            self._create(attrs, compression)
            self.rows_written = 0
            self.pool_rows_done = 0

    def _open(self, mode: str) -> h5py.File:
        return h5py.File(self.path, mode, rdcc_nbytes=_CACHE_BYTES, rdcc_nslots=10007)

    def _attach(self, f: h5py.File) -> None:
        self._file = f
        try:
            self._fd = int(f.id.get_vfd_handle())
        except (TypeError, ValueError, RuntimeError, OSError):  # a driver without a POSIX descriptor
            self._fd = -1
        # Held open for the writer's life: a dataset closed after each write would flush its chunk
        # cache in h5py's deallocator, where a failed write is printed and ignored, not raised.
        self._datasets = {name: f[name] for name in _DTYPES if name in f}

    def _check_resumable(self, attrs: dict) -> bool:
        """True if `path` is an unfinished write of this same job whose recorded rows are all on disk.
        Sets `discarded` to the reason when the file is ours but cannot be trusted."""
        if not os.path.isfile(self.path):
            return False
        try:
            f = self._open("r")  # read-only: checking a damaged file must not write to it
        except Exception as e:  # garbage, or torn by a kill or a full disk mid-append: start afresh
            self.discarded = f"cannot be opened: {_first_line(e)}"
            return False
        try:
            with f:
                a = f.attrs
                images = f.get("images")
                same = (
                    _to_python(a.get("schema_version")) == SCHEMA_VERSION
                    and _to_python(a.get("complete")) == 0
                    and images is not None
                    and images.shape == (self.capacity, *self.image_shape)
                    and _to_python(a.get("num_classes")) == self.num_classes
                    and ("logits" in f) == self.save_logits
                    and _to_python(a.get("pool_fingerprint")) == _to_python(attrs["pool_fingerprint"])
                    and _to_python(a.get("teacher_fingerprint")) == _to_python(attrs["teacher_fingerprint"])
                )
                if not same:  # finished, or another job's: replaced without comment
                    return False
                rows, pool_rows = int(a.get("rows_written", -1)), int(a.get("pool_rows_done", -1))
                if not 0 <= rows <= min(self.capacity, pool_rows):
                    self.discarded = f"rows_written {rows}, pool_rows_done {pool_rows}"
                    return False
                missing = _rows_not_on_disk(f, rows, os.path.getsize(self.path))
                if missing:
                    self.discarded = f"claims {rows} rows but {missing}"
                    return False
                return True
        except Exception as e:  # h5py raises OSError, RuntimeError, KeyError... on a damaged file
            self.discarded = f"cannot be read: {_first_line(e)}"
            return False

    @contextlib.contextmanager
    def _storage_failures(self) -> Iterator[None]:
        """A full disk or I/O error while HDF5 writes: abandon the file and raise the UserError."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            error = storage_error(e, self.path)
            if error is None:
                raise
            self._abandon()
            raise error from e

    def _abandon(self) -> None:
        """Close the file without HDF5 writing to it again.

        After a failed write HDF5 keeps its metadata dirty and retries it on every close and again at
        exit, where the second failure crashes the process ("Slist already enabled?", then a segfault).
        Pointing the driver's descriptor at /dev/null lets that close succeed while the file keeps what
        the last successful flush wrote; the next writer checks it before resuming.
        """
        f, self._file = self._file, None
        if f is None:
            return
        if self._fd >= 0:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, self._fd)
            finally:
                os.close(null)
        with contextlib.suppress(Exception):  # nothing useful is left to report about this handle
            f.close()
        self._datasets, self._fd = {}, -1  # after the close: dropping an open dataset would flush it

    def _durable_flush(self) -> None:
        self._file.flush()
        if self._fd >= 0:
            os.fsync(self._fd)

    def _create(self, attrs: dict, compression: str | None) -> None:
        try:
            with self._storage_failures():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # a new inode: nothing of a damaged file (or another's handle) survives
                self._attach(self._open("w"))
                self._create_datasets(attrs, compression)
        except UserError:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # an empty, half-created file is no use to a resume
            raise

    def _create_datasets(self, attrs: dict, compression: str | None) -> None:
        f = self._file
        n = self.capacity
        image_chunk = (self.rows_per_chunk, *self.image_shape)
        column_chunk = (min(_COLUMN_CHUNK_ROWS, max(1, n)),)
        # maxshape None on the row axis: finish() shrinks to the rows kept.
        f.create_dataset("images", shape=(n, *self.image_shape), maxshape=(None, *self.image_shape),
                         dtype=np.uint8, chunks=image_chunk, compression=compression,
                         dcpl=None if compression else _preallocated())
        for name in ("labels", "confidence", "pool_index"):
            f.create_dataset(name, shape=(n,), maxshape=(None,), dtype=_DTYPES[name], chunks=column_chunk,
                             dcpl=_preallocated())
        if self.save_logits:
            k = self.num_classes
            f.create_dataset("logits", shape=(n, k), maxshape=(None, k), dtype=np.float16,
                             chunks=(column_chunk[0], k), dcpl=_preallocated())
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["num_classes"] = self.num_classes
        f.attrs["rows_written"] = 0
        f.attrs["pool_rows_done"] = 0
        f.attrs["complete"] = 0
        self._datasets = {name: f[name] for name in _DTYPES if name in f}
        self._durable_flush()

    def append(self, *, images, labels, confidence, pool_index, logits=None, pool_rows_done: int) -> None:
        """Write the kept rows of a pool batch; `pool_rows_done` = pool rows examined so far (kept or not)."""
        if self._file is None:
            raise ValueError("PseudoLabelWriter: append after close/finish")
        images = np.asarray(images)
        n = len(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"images must be uint8 (n, {self.image_shape}), got {images.dtype} {images.shape}")
        columns = {"labels": labels, "confidence": confidence, "pool_index": pool_index}
        if self.save_logits:
            if logits is None:
                raise ValueError("save_logits=True: append needs logits")
            columns["logits"] = logits
        elif logits is not None:
            raise ValueError("save_logits=False: append got logits")
        columns = {k: np.asarray(v).astype(_DTYPES[k], copy=False) for k, v in columns.items()}
        for name, col in columns.items():
            if len(col) != n:
                raise ValueError(f"{name} has {len(col)} rows, images has {n}")
        start, stop = self.rows_written, self.rows_written + n
        if stop > self.capacity:
            raise ValueError(f"capacity {self.capacity} exceeded: {stop} rows")
        if pool_rows_done < self.pool_rows_done or pool_rows_done < stop:
            raise ValueError(f"pool_rows_done={pool_rows_done} went backwards or below the rows written")

        with self._storage_failures():
            if n:
                self._datasets["images"][start:stop] = images
                for name, col in columns.items():
                    self._datasets[name][start:stop] = col
        self.rows_written, self.pool_rows_done = stop, int(pool_rows_done)
        if time.monotonic() - self._committed_at >= self.commit_seconds:
            self._commit()

    def _commit(self) -> None:
        # The rows reach the disk (flush and fsync: NFS reports a full disk only there) before the counts
        # that record them, so the counts on disk never run ahead of the rows. The counts themselves need
        # no fsync: if they are lost, a resume redoes these rows, and the next commit's fsync (or the
        # close) reports any failure to write them.
        with self._storage_failures():
            self._durable_flush()
            self._file.attrs["rows_written"] = self.rows_written
            self._file.attrs["pool_rows_done"] = self.pool_rows_done
            self._file.flush()
        self._committed_at = time.monotonic()

    def finish(self) -> None:
        """Shrink every dataset to the rows written, mark the file complete, close it."""
        if self._file is None:
            raise ValueError("PseudoLabelWriter: finish after close")
        self._commit()
        with self._storage_failures():
            for dataset in self._datasets.values():
                dataset.resize(self.rows_written, axis=0)
            self._durable_flush()  # the shrunk layout on disk before the mark that says it is final
            self._file.attrs["complete"] = 1
            self._durable_flush()
        self.close()

    def close(self) -> None:
        """Close without finishing: the file stays incomplete and resumable."""
        if self._file is not None:
            with self._storage_failures():
                self._file.close()  # closes the datasets too, raising (not printing) a failed flush
            self._file, self._datasets, self._fd = None, {}, -1

    def __enter__(self) -> "PseudoLabelWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _preallocated():
    """Dataset creation properties: every chunk placed in the file (and indexed) when the dataset is
    created, none of it written until the rows come (the file stays sparse). Appends then only write
    data into place and never change the file's structure, so a write that fails on a full disk
    cannot leave a chunk index that points past the end of the file. (Compressed chunks change size
    as they are written, so a compressed file is laid out chunk by chunk as before.)"""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _rows_not_on_disk(f: h5py.File, rows: int, file_size: int) -> str | None:
    """Which of the first `rows` rows of each dataset the file does not hold, or None if it holds them all.

    A full disk can leave the chunk index pointing past the end of the file, or chunks never allocated;
    reading the last claimed row then makes HDF5 read the chunk, which catches what the index hides.
    """
    for name in _DTYPES:
        if name not in f or rows == 0:
            continue
        ds = f[name]
        chunk_rows = ds.chunks[0] if ds.chunks else rows
        for first in range(0, rows, chunk_rows):
            info = ds.id.get_chunk_info_by_coord((first,) + (0,) * (ds.ndim - 1))
            if info.byte_offset is None or info.byte_offset + info.size > file_size:
                return f"{name!r} rows from {first} are not in the file"
        ds[rows - 1]
    return None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


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
        if not isinstance(ds, h5py.Dataset) or ds.dtype != _DTYPES[name]:
            dtype = getattr(ds, "dtype", "a group")
            raise _fail(path, f"dataset {name!r} is {dtype}, expected {np.dtype(_DTYPES[name])}")
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
            self._file = h5py.File(self.path, "r", rdcc_nbytes=_CACHE_BYTES, rdcc_nslots=10007)
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


COLUMN_BLOCK_ROWS = 1 << 20  # rows of the 1-D columns read at a time (about 20 MiB for labels + confidence + pool_index)


def iter_column_blocks(path, names: tuple[str, ...] | list[str],
                       rows_per_block: int = COLUMN_BLOCK_ROWS) -> Iterator[dict[str, np.ndarray]]:
    """The columns `names` (of labels, confidence, pool_index, logits) of a pseudolabels.h5, a block of
    rows at a time as {name: array}, in row order: memory does not grow with the pool. A reader of a
    file it did not just write validates it first (validate_pseudolabels)."""
    unknown = [n for n in names if n not in _DTYPES or n == "images"]
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
