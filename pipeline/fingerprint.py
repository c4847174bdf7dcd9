"""Content fingerprints: canonical JSON -> sha256, and file digests memoised on (size, mtime_ns)."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

# Files above this size are fingerprinted from their size, mtime and sampled blocks rather than a full
# read: a 50M-image pool is ~150 GB and hashing it on every `status` would take minutes.
FULL_HASH_LIMIT_BYTES = 2 << 30
_SAMPLE_BLOCK_BYTES = 1 << 20
_SAMPLE_BLOCKS = 64

_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, so equal values always give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable)


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


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (sampled for huge files), memoised on (path, size, mtime_ns)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_LIMIT_BYTES:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:
            h.update(f"sampled:{st.st_size}:{st.st_mtime_ns}".encode())
            stride = st.st_size // _SAMPLE_BLOCKS
            for i in range(_SAMPLE_BLOCKS):
                f.seek(i * stride)
                h.update(f.read(_SAMPLE_BLOCK_BYTES))
    digest = h.hexdigest()
    with _memo_lock:
        _memo[key] = digest
    return digest


def array_digest(*arrays) -> str:
    """sha256 over numpy arrays' dtype, shape and bytes (for data loaded into memory)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B") if a.flags.c_contiguous else a.tobytes())
    return h.hexdigest()
