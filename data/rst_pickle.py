"""RST's pool pickle converted once into uncompressed .npy files that the pool then reads in place.

A pickle can only be read by unpickling all of it, so `convert_rst_pickle` does that once: the images
(and the labels that came with them) are written as .npy files named by the pickle's digest in a cache
directory, atomically, under a lock so that concurrent ranks convert once. A changed pickle has another
digest and converts again; a converted file can be deleted at any time (it is rebuilt on next use).

RAM for the one-time conversion: about the size of the images, once. Unpickling a protocol 3-5 pickle
(Python 3's pickle.dump; RST's ti_500K_pseudo_labeled.pickle is one) builds the array on the bytes it
read, without a copy, and np.save writes from that array. Measured (VmHWM, 2-core AMD EPYC, numpy 2,
a synthetic 34,000 x 32x32x3 uint8 pickle of 99.9 MiB with 34,000 int64 labels): peak RSS grew by 99-100
MiB = 1.0x the pickle for protocols 3, 4 and 5, and by 249 MiB = 1.66x the pickle (149.7 MiB, 2.5x the
images) for protocol 2, whose bytes are stored as latin-1 text and re-encoded. So RST's 500K pool
(1.5 GB of images) needs about 1.6 GB free for a few seconds, once; later runs read the .npy in place.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path

import numpy as np

from data.safe_pickle import safe_load
from pipeline.core.atomic import atomic_path
from pipeline.core.errors import UserError
from pipeline.core.fingerprint import file_digest


def converted_paths(pickle_path: Path, cache_dir: Path) -> tuple[Path, Path]:
    """Where the images and the labels of `pickle_path` go: named by its content digest."""
    stem = f"rst-pickle-{file_digest(pickle_path)}"
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.labels.npy"


def convert_rst_pickle(pickle_path: Path, cache_dir: Path) -> tuple[Path, Path | None]:
    """The images .npy (and labels .npy, or None) for `pickle_path`, converting it on first use."""
    images_path, labels_path = converted_paths(pickle_path, cache_dir)
    if not images_path.exists():  # the images file is renamed into place last: its presence means done
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with _locked(cache_dir / f"{images_path.stem}.lock"):
                if not images_path.exists():  # another rank may have converted it while this one waited
                    _convert(pickle_path, images_path, labels_path)
        except OSError as e:
            raise UserError(f"cannot write the converted pool for {pickle_path} into {cache_dir} ({e.strerror or e}); "
                            "make room there (it needs about the pickle's size) or fix its permissions.") from None
    return images_path, (labels_path if labels_path.exists() else None)


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _convert(pickle_path: Path, images_path: Path, labels_path: Path) -> None:
    content = safe_load(pickle_path)
    if not isinstance(content, dict) or "data" not in content:
        raise UserError(f"{pickle_path} is not an RST pool pickle: expected a dict with a 'data' array (and optional "
                        "'extrapolated_targets'); check pool.path or pick another pool.provider.")
    images = np.asarray(content.pop("data"))
    labels = content.pop("extrapolated_targets", None)
    del content
    if images.dtype.hasobject or images.ndim < 1:
        raise UserError(f"{pickle_path}: 'data' is {images.dtype} {images.shape}, not an array of images; convert "
                        "the pool offline to a uint8 (N, H, W, C) array.")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.dtype.hasobject:
            raise UserError(f"{pickle_path}: 'extrapolated_targets' is not an array of numbers; fix or drop it.")
        _save(labels_path, labels)
    _save(images_path, images)


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
        np.save(f, array, allow_pickle=False)
