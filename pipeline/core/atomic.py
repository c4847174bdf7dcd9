"""Write files so that a reader sees the old file or the complete new one, never a torn one.

Every writer goes through a temporary name in the destination's own directory (so the final
os.replace is a rename within one filesystem, which POSIX makes atomic) and fsyncs before renaming.
The file gets the mode a plain open() would give it under the umask (not mkstemp's 0600), and a
full disk, quota, read-only filesystem, I/O error or permission problem is a UserError naming the
file and the free space (pipeline.core.errors.storage_error), with the temporary file removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import storage_errors

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status; elsewhere os.umask is the only way to
    read it, by setting it and back, which a thread creating a file meanwhile could observe."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)  # meanwhile the strictest mask, so a racing file is never too open
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """What open(path, "w") gives a new file: 0666 less the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on clean exit it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        with storage_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            tmp_path = Path(tmp)
            try:
                # A teammate on a shared filesystem must read the artifacts as they read any file of ours.
                os.fchmod(fd, new_file_mode())
            finally:
                os.close(fd)
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
    finally:
        if tmp_path is not None:
            with contextlib.suppress(OSError):  # gone after the rename; on a dead disk the first error counts
                tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch  # the engine itself never needs torch; only stages that save tensors reach here

    # Through a Python file, not a path: torch's own writer reports a full disk as an errno-less
    # "[enforce fail at inline_container.cc] unexpected pos", a Python file raises OSError(ENOSPC).
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def atomic_write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV atomically (metrics are appended by rewriting the whole file)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
