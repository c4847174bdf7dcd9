"""The one exception type that means "the user can fix this", and the storage failures that become one."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """Bad configuration or bad data: the CLI prints the message as one paragraph and exits 2.

    The message names the offending file or key and says how to fix it. Anything else that escapes
    a stage is a bug in rst-mart and exits 1 with a traceback.
    """



def missing_package_error(key: str, requirement: str, extra: str) -> UserError:
    """`key = true` needs the optional package `requirement` names (pinned as pyproject's `extra` is)."""
    package = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0]
    return UserError(f"{key} = true needs the `{package}` package, which is not installed; install it with "
                     f"`pip install {requirement}` (or `pip install 'rst-mart[{extra}]'` for all of that extra's), "
                     f"or turn the option off with --set {key}=false.")


_RERUN = "then rerun the same command: it resumes"
# errno -> (what happened, how to fix it). A full disk or a lost mount is the user's to fix, not a bug.
STORAGE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device",
                   f"Free space or point --workdir at a larger filesystem, {_RERUN}."),
    errno.EDQUOT: ("disk quota exceeded",
                   f"Free space within your quota or point --workdir at a larger filesystem, {_RERUN}."),
    errno.EROFS: ("the filesystem is read-only",
                  f"Point --workdir at a writable filesystem (or remount this one read-write), {_RERUN}."),
    errno.EIO: ("input/output error (a failing disk or a lost network mount)",
                f"Check the device or mount (dmesg), free space or point --workdir at another filesystem, "
                f"{_RERUN}."),
    errno.EACCES: ("permission denied",
                   f"Give yourself access to it (chmod, or ask its owner) or point --workdir at a folder you "
                   f"own, {_RERUN}."),
}
# h5py reports HDF5's failed writes as RuntimeError/OSError quoting the C errno in the message.
_QUOTED_ERRNO = re.compile(r"errno = (\d+)")
# torch.save to a path reports a short write as a RuntimeError without errno.
_TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter failed", "file write failed")


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a storage failure in `exc` or the exceptions it chains (torch.save into a Python
    file raises its RuntimeError while handling the file's OSError): an OSError's own, or one h5py
    quotes; -1 for torch's errno-less "write failed"; None when it is not a failure we translate."""
    found, seen = None, set()
    # Only through I/O-shaped links: a bug raised while handling a full disk stays a bug.
    while isinstance(exc, (OSError, RuntimeError)) and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            quoted = _QUOTED_ERRNO.search(str(exc))
            code = int(quoted[1]) if quoted else None
            if code is None and isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_FAILED):
                found = -1
        if code in STORAGE_ERRNOS:
            return code
        exc = exc.__cause__ or exc.__context__
    return found


def storage_error(exc: BaseException, path: str | os.PathLike, doing: str = "writing") -> UserError | None:
    """A one-paragraph UserError for a failed `doing` of `path` that the user can fix (disk full, quota,
    read-only filesystem, I/O error, permission denied): the path, the free space on its filesystem and
    the fix. None when `exc` is not such a failure (the caller re-raises it). An OSError that names its
    own file (an open() that failed) is reported with that file."""
    code = storage_errno(exc)
    if code is None:
        return None
    if isinstance(exc, OSError) and exc.filename and exc.errno == code:
        path = exc.filename
    if code == -1:
        what, fix = (f"the write failed ({str(exc).strip()})",
                     f"This is usually a full disk: free space or point --workdir at a larger filesystem, {_RERUN}.")
    else:
        what, fix = STORAGE_ERRNOS[code]
    return UserError(f"{doing} {os.fspath(path)} failed: {what}; {free_space(path)}. {fix}")


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike, doing: str = "writing") -> Iterator[None]:
    """Inside the block, a storage failure (see storage_error) becomes its UserError about `path`."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        error = storage_error(e, path, doing)
        if error is None:
            raise
        raise error from e


def free_space(path: str | os.PathLike) -> str:
    """'12.3 GiB free of 100 GiB on the filesystem of <dir>', for the nearest existing folder of `path`."""
    folder = Path(os.path.abspath(path))
    while not os.path.isdir(folder) and folder != folder.parent:  # isdir: False, not an error, on EACCES
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError as e:
        return f"the free space on the filesystem of {folder} is unknown ({e.strerror})"
    return f"{human_bytes(usage.free)} free of {human_bytes(usage.total)} on the filesystem of {folder}"


def human_bytes(count: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while count >= 1024 and power < len(units) - 1:
        count, power = count / 1024, power + 1
    return f"{count:.0f} B" if power == 0 else f"{count:.1f} {units[power]}"
