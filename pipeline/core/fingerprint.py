"""Content fingerprints: canonical JSON -> sha256, and file digests cached across processes.

`file_digest` remembers what it hashed in a small sqlite database (like git's index or DVC's state)
keyed by the file's resolved path, size, mtime_ns, ctime_ns and inode, so a 10 GB pool is hashed once,
not on every `status`, and a file that was edited, replaced or touched is hashed again. The ctime is
what catches an edit that keeps the size and puts the old mtime back (`touch -d`, `cp -p`, `rsync -t`
over it): only the kernel sets ctime, to "now", on every write, chmod or utime, and no unprivileged
call can set it back. The cache is a
convenience: when its location cannot be written or its database cannot be read, digests fall back to
a per-process memo and the run goes on.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from pipeline.core.bounded import open_regular

# Files above this size are fingerprinted from their size, mtime and sampled blocks rather than a full
# read: a 50M-image pool is ~150 GB and hashing it even once would take many minutes.
FULL_HASH_LIMIT_BYTES = 2 << 30
_SAMPLE_BLOCK_BYTES = 1 << 20
_SAMPLE_BLOCKS = 64
# The digest's method, stored with it: a change of the sampling rule must not reuse old digests.
_METHOD = f"sha256;full<={FULL_HASH_LIMIT_BYTES};sampled={_SAMPLE_BLOCKS}x{_SAMPLE_BLOCK_BYTES}"
# A file modified this recently may be modified again within the filesystem's timestamp granularity
# (a jiffy on Linux, 2 s on FAT) without its mtime changing: git's "racily clean" problem. Such a
# file is hashed but its digest is not remembered until it is older.
RACY_WINDOW_NS = 2_000_000_000

CACHE_DIR_ENV = "RST_MART_CACHE_DIR"
_DB_NAME = "digests-v2.sqlite3"  # v2: rows keyed on ctime_ns too (the v1 file is left unread)
_DB_TIMEOUT_S = 10.0  # another process writing its digest holds the lock for milliseconds
# Rows of files that no longer exist (deleted work dirs, temporary pools) are dropped once the table
# grows past this: a stat per row, some 20 ms at this size, paid once per so many new digests.
_PRUNE_ABOVE_ROWS = 10_000

_memo: dict[tuple, str] = {}
_memo_lock = threading.Lock()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always give equal text (-0.0 is written
    as 0.0: they compare equal, and `mart.beta = -0.0` is the same run as `0.0`)."""
    return json.dumps(_without_negative_zero(obj), sort_keys=True, separators=(",", ":"), default=_jsonable)


def _without_negative_zero(obj: Any) -> Any:
    # json.dumps never calls `default` for a float, so -0.0 must be replaced before it writes "-0.0".
    if isinstance(obj, float):
        return 0.0 if obj == 0.0 else obj
    if isinstance(obj, dict):
        return {k: _without_negative_zero(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_without_negative_zero(v) for v in obj]
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"cannot fingerprint {type(obj).__name__}: {obj!r}")


def fingerprint(obj: Any) -> str:
    """sha256 hex digest of the canonical JSON of `obj`."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def user_cache_dir() -> Path:
    """$RST_MART_CACHE_DIR, else $XDG_CACHE_HOME/rst-mart, else ~/.cache/rst-mart (not created here)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rst-mart"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (sampled above FULL_HASH_LIMIT_BYTES), cached on (path, size, mtime_ns,
    ctime_ns, inode). NotRegularFile (an OSError) for a FIFO or a device: they are never read."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    digest = _cached_digest(key)
    if digest is None:
        started_ns = time.time_ns()
        digest = hash_file(path, st)
        # mtime only, as git's racy check: tests and `cp -p` set an old mtime, no one can set an old ctime
        if st.st_mtime_ns >= started_ns - RACY_WINDOW_NS:
            return digest  # too fresh to trust its mtime: remember nothing yet
        _store_digest(key, digest)
    with _memo_lock:
        _memo[key] = digest
    return digest


def hash_file(path: Path, st: os.stat_result) -> str:
    """sha256 of the file's bytes, or above FULL_HASH_LIMIT_BYTES of its size, mtime and 64 sampled blocks;
    never cached (the stage store verifies outputs with it). Only a regular file is opened (NotRegularFile
    otherwise): a FIFO or /dev/zero where a file was expected must not hang or read forever."""
    h = hashlib.sha256()
    fd, _ = open_regular(path)
    with open(fd, "rb") as f:
        if st.st_size <= FULL_HASH_LIMIT_BYTES:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f"sampled:{st.st_size}:{st.st_mtime_ns}".encode())
            stride = st.st_size // _SAMPLE_BLOCKS
            for i in range(_SAMPLE_BLOCKS):
                f.seek(i * stride)
                h.update(f.read(_SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


@contextlib.contextmanager
def _database():
    """A connection to the digest database, or None where it cannot be opened (unwritable, corrupt)."""
    connection = None
    try:
        directory = user_cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        # A connection per call: safe across threads and forks, and cheap next to hashing a pool.
        connection = sqlite3.connect(directory / _DB_NAME, timeout=_DB_TIMEOUT_S, isolation_level=None)
        connection.execute("CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, "
                           "mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER, method TEXT, digest TEXT)")
    except (OSError, sqlite3.Error):
        if connection is not None:
            connection.close()
        connection = None
    try:
        yield connection
    finally:
        if connection is not None:
            connection.close()


def _cached_digest(key: tuple) -> str | None:
    path, size, mtime_ns, ctime_ns, inode = key
    with _database() as db:
        if db is None:
            return None
        try:
            row = db.execute("SELECT digest FROM digests WHERE path = ? AND size = ? AND mtime_ns = ? AND ctime_ns = ? "
                             "AND inode = ? AND method = ?",
                             (path, size, mtime_ns, ctime_ns, inode, _METHOD)).fetchone()
        except sqlite3.Error:
            return None
    return row[0] if row else None


def _store_digest(key: tuple, digest: str) -> None:
    # One row per path: an edited file replaces its old entry, so the database does not grow with edits.
    with _database() as db:
        if db is None:
            return
        with contextlib.suppress(sqlite3.Error):
            db.execute("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?, ?)", (*key, _METHOD, digest))
            if db.execute("SELECT COUNT(*) FROM digests").fetchone()[0] > _PRUNE_ABOVE_ROWS:
                gone = [(p,) for (p,) in db.execute("SELECT path FROM digests") if not os.path.exists(p)]
                db.executemany("DELETE FROM digests WHERE path = ?", gone)


def array_digest(*arrays) -> str:
    """sha256 over numpy arrays' dtype, shape and bytes (for data loaded into memory)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B") if a.flags.c_contiguous else a.tobytes())
    return h.hexdigest()
