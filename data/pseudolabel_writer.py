"""The resumable writer of `pseudolabels.h5` (the format, its validator and reader: data/pseudolabel_file.py)."""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import h5py
import numpy as np

from data.direct_chunks import ALIGNMENT, DirectChunkWrites, aligned
from data.pseudolabel_file import CACHE_BYTES, DTYPES, REQUIRED_ATTRS, SCHEMA_VERSION, default_rows_per_chunk, to_python
from pipeline.core.errors import UserError, storage_error

# Attributes the writer owns: a caller passing them would silently fight the bookkeeping.
_BOOKKEEPING_ATTRS = ("rows_written", "pool_rows_done", "complete")
# 1-D columns are read whole, so their chunks only need to be large enough to keep metadata small.
_COLUMN_CHUNK_ROWS = 1 << 16


class PseudoLabelWriter:
    """Preallocated, chunked, resumable writer. Rows are appended in pool order (only the kept rows).

    If `path` holds an incomplete file of ours written for the same pool and teacher (same
    `pool_fingerprint`, `teacher_fingerprint`, image shape, capacity, `num_classes`, `save_logits`),
    it is reopened and writing resumes at its `rows_written`/`pool_rows_done` (`resumed` is True);
    anything else at `path` (finished, foreign, different teacher) is replaced, and so is a file that
    cannot be read or claims rows it does not hold (`discarded` says why, and `log` is told).

    A full disk or I/O error while writing raises a UserError naming the file and the free space. The
    file then keeps what the last commit made durable: the rows are flushed and fsynced before
    `rows_written` records them, so the recorded progress never runs ahead of the disk. With
    `commit_seconds` = 0 every append commits, fsync included; with more, an append commits only when
    that long has passed since the last commit (and `finish` always does), and the fsync runs in a
    thread of its own: the counts it covers are recorded by the next commit once it has returned, so
    the producer does not wait for the disk (the thread mostly waits on the device) and a kill redoes at
    most two intervals of work (`rows_written`/`pool_rows_done` here count every appended row; the file's
    attributes, what a resume reads, count the committed).
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
            if key in attrs and to_python(attrs[key]) != ours:
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
        self._syncer: ThreadPoolExecutor | None = None  # one thread: the direct chunk writes, then the fsyncs
        self._sync: Future | None = None  # the fsync in flight, and the counts it makes durable
        self._direct: DirectChunkWrites | None = None
        self._sync_counts = (0, 0)

        self.discarded: str | None = None
        self.resumed = self._check_resumable(attrs)
        if self.resumed:
            with self._storage_failures():
                self._attach(self._open("r+"))
                self._open_direct()
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
        # Chunks of 4 KiB or more start on a 4 KiB boundary, where O_DIRECT can write them (data/direct_chunks.py).
        return h5py.File(self.path, mode, rdcc_nbytes=CACHE_BYTES, rdcc_nslots=10007,
                         alignment_threshold=ALIGNMENT, alignment_interval=ALIGNMENT)

    def _attach(self, f: h5py.File) -> None:
        self._file = f
        try:
            self._fd = int(f.id.get_vfd_handle())
        except (TypeError, ValueError, RuntimeError, OSError):  # a driver without a POSIX descriptor
            self._fd = -1
        # Held open for the writer's life: a dataset closed after each write would flush its chunk
        # cache in h5py's deallocator, where a failed write is printed and ignored, not raised.
        self._datasets = {name: f[name] for name in DTYPES if name in f}

    def _open_direct(self) -> None:
        if self._direct_chunks:
            self._direct = DirectChunkWrites.open(self.path, self._fd, lambda *task: self._thread().submit(*task))

    def _thread(self) -> ThreadPoolExecutor:
        self._syncer = self._syncer or ThreadPoolExecutor(1, thread_name_prefix="h5-writes")
        return self._syncer

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
                    to_python(a.get("schema_version")) == SCHEMA_VERSION
                    and to_python(a.get("complete")) == 0
                    and images is not None
                    and images.shape == (self.capacity, *self.image_shape)
                    and to_python(a.get("num_classes")) == self.num_classes
                    and ("logits" in f) == self.save_logits
                    and to_python(a.get("pool_fingerprint")) == to_python(attrs["pool_fingerprint"])
                    and to_python(a.get("teacher_fingerprint")) == to_python(attrs["teacher_fingerprint"])
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
        self._stop_syncing()
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
        if self._direct is not None:
            self._direct.wait()
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
                self._open_direct()
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
            f.create_dataset(name, shape=(n,), maxshape=(None,), dtype=DTYPES[name], chunks=column_chunk,
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
        self._datasets = {name: f[name] for name in DTYPES if name in f}
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
        columns = {k: np.asarray(v).astype(DTYPES[k], copy=False) for k, v in columns.items()}
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
                self._write_images(start, images)
                for name, col in columns.items():
                    self._datasets[name][start:stop] = col
        self.rows_written, self.pool_rows_done = stop, int(pool_rows_done)
        if time.monotonic() - self._committed_at >= self.commit_seconds:
            self._commit()

    def _write_images(self, start: int, images: np.ndarray) -> None:
        """The rows' whole chunks go to the file as they are (O_DIRECT from the writer's thread where the file
        system takes it, data/direct_chunks.py; else HDF5's write_direct_chunk), the partial ones at the edges
        through HDF5's chunk cache. Through the cache a whole chunk is copied into it and written out at its
        eviction or the next flush: 1.35 s of HDF5 flushes in a 55 s stage (500,000 32x32x3 images, 2-core
        CPU), 0.015 s direct."""
        dataset, c, end = self._datasets["images"], self.rows_per_chunk, start + len(images)
        first, last = min(-(-start // c) * c, end), end // c * c  # the whole chunks' rows: [first, last)
        if last <= first or not self._direct_chunks:
            dataset[start:end] = images
            return
        rows, origin = np.ascontiguousarray(images), (0,) * len(self.image_shape)
        for chunk_start in range(first, last, c):
            chunk, coord = rows[chunk_start - start:chunk_start - start + c], (chunk_start, *origin)
            offset = dataset.id.get_chunk_info_by_coord(coord).byte_offset if self._direct is not None else None
            if offset is not None and aligned(offset, chunk.nbytes):
                self._direct.write(chunk, offset)
            else:  # no O_DIRECT here, or a chunk HDF5 did not align (a file written before alignment was asked for)
                dataset.id.write_direct_chunk(coord, chunk)
        if first > start:
            dataset[start:first] = images[:first - start]
        if end > last:
            dataset[last:end] = images[last - start:]

    @property
    def _direct_chunks(self) -> bool:
        # Filtered chunks (compression) are stored encoded: only HDF5 can write them.
        return self._datasets["images"].id.get_create_plist().get_nfilters() == 0

    def _commit(self, wait: bool = False) -> None:
        # The rows reach the disk (flush and fsync: NFS reports a full disk only there) before the counts
        # that record them, so the counts on disk never run ahead of the rows. The counts themselves need
        # no fsync: if they are lost, a resume redoes these rows, and the next commit's fsync (or the
        # close) reports any failure to write them.
        wait = wait or self.commit_seconds <= 0 or self._fd < 0
        with self._storage_failures():
            if self._sync is not None:
                if not (wait or self._sync.done()):
                    return  # the disk has not caught up: record nothing new yet, try again at the next append
                self._sync.result()  # raises what the fsync raised
                self._record(*self._sync_counts)
                self._sync = None
            counts = (self.rows_written, self.pool_rows_done)
            if wait:
                self._durable_flush()
                self._record(*counts)
                self._file.flush()
            else:
                self._file.flush()  # HDF5's caches to the kernel; the fsync only waits for the disk
                # Behind the direct chunk writes queued so far on the same thread: it returns after them.
                self._sync, self._sync_counts = self._thread().submit(self._fsync_after_direct_writes), counts
        self._committed_at = time.monotonic()

    def _fsync_after_direct_writes(self) -> None:
        if self._direct is not None:
            self._direct.raise_failure()  # the counts must not cover a chunk that was not written
        os.fsync(self._fd)

    def _record(self, rows_written: int, pool_rows_done: int) -> None:
        self._file.attrs["rows_written"] = rows_written
        self._file.attrs["pool_rows_done"] = pool_rows_done

    def _stop_syncing(self) -> None:
        """Wait for an fsync in flight (its failure is the caller's to report, or moot) and end its thread."""
        if self._sync is not None:
            with contextlib.suppress(OSError):
                self._sync.result()
            self._sync = None
        if self._syncer is not None:
            self._syncer.shutdown()  # waits for the queued chunk writes too
            self._syncer = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def finish(self) -> None:
        """Shrink every dataset to the rows written, mark the file complete, close it."""
        if self._file is None:
            raise ValueError("PseudoLabelWriter: finish after close")
        self._commit(wait=True)
        with self._storage_failures():
            for dataset in self._datasets.values():
                dataset.resize(self.rows_written, axis=0)
            self._durable_flush()  # the shrunk layout on disk before the mark that says it is final
            self._file.attrs["complete"] = 1
            self._durable_flush()
        self.close()

    def close(self) -> None:
        """Close without finishing: the file stays incomplete and resumable, counting what reached the disk."""
        if self._file is not None and self._sync is not None:
            with contextlib.suppress(OSError, RuntimeError):  # a failed fsync: those rows are redone
                self._sync.result()
                self._record(*self._sync_counts)
        self._stop_syncing()
        if self._file is not None:
            with self._storage_failures():
                self._file.close()  # closes the datasets too, raising (not printing) a failed flush
            self._file, self._datasets, self._fd = None, {}, -1

    def __enter__(self) -> PseudoLabelWriter:
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
    for name in DTYPES:
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
