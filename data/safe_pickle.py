"""Unpickling that can only build numpy arrays and plain containers, never run code.

Two formats we must read are pickles by nature: the official CIFAR-10 python batches and RST's
`ti_500K_pseudo_labeled.pickle`. A plain `pickle.load` on a downloaded file runs whatever callable the
file names, so `safe_load` resolves globals through an exact allow-list instead.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from pipeline.core.errors import UserError

try:  # numpy >= 2 moved the internals to numpy._core; numpy.core still works but warns on access
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Python 3 writes `bytes` into protocol-2 pickles as _codecs.encode(text, "latin1"); allowing only
    # that encoding keeps the codec machinery (which can look up arbitrary codecs) out of reach.
    if encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


# (module, name) as written in the pickle -> the object to use. Both numpy 1 and numpy 2 spellings map
# to the same internals so a pickle written by either numpy loads under the installed one, warning-free.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Protocol 5 (pickle.HIGHEST_PROTOCOL) stores arrays as a raw buffer rebuilt by _frombuffer.
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    # Python 3 bytes inside protocol <= 2 pickles (e.g. CIFAR-10 style b'data' keys).
    ("_codecs", "encode"): _latin1_encode,
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        # latin1 turns Python-2 `str` (raw bytes) into text byte for byte, which is also what numpy
        # needs to rebuild arrays pickled by Python 2.
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(
                f"{self.path} contains a pickled reference to {module}.{name}, which rst-mart refuses "
                "to load because unpickling it could run code; only numpy arrays and plain Python "
                "containers are accepted from pickle files. Fix: convert the file to .npz, .npy or "
                "HDF5 with a trusted script (e.g. np.savez(out, image=data)) and point the config at "
                "the converted file."
            ) from None


def _str_keys(obj: Any) -> Any:
    """Dict keys as str at every level: Python-2 pickles read as bytes keys (b'data') otherwise."""
    if isinstance(obj, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): _str_keys(v) for k, v in obj.items()}
    return obj


def safe_load(path: str | os.PathLike) -> Any:
    """Unpickle `path` allowing only numpy arrays/dtypes/scalars and builtin containers.

    Dict keys that are bytes are decoded to str. A missing, truncated or corrupt file, or one that
    refers to any other global, raises UserError naming the file.
    """
    path = os.fspath(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; check the path in the config.") from None
    except OSError as e:
        raise UserError(f"cannot open {path}: {e.strerror}; check the path and its permissions.") from None
    with f:
        try:
            obj = _AllowListUnpickler(f, path).load()
        except UserError:
            raise
        # Truncation and corruption surface as many exception types (EOFError, UnpicklingError,
        # ValueError from numpy's setstate, ...): all of them mean "this file is not a valid pickle".
        except Exception as e:
            raise UserError(
                f"{path} is not a readable pickle ({type(e).__name__}: {e}); the file is probably "
                "truncated or corrupt: download or copy it again."
            ) from None
    return _str_keys(obj)
