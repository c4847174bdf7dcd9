"""Unlabeled pools: the provider protocol, the registry, the built-in providers and `open_pool`.

A pool is any object with `name: str`, `__len__()`, `read(start, stop) -> np.ndarray` (uint8 NHWC,
C-contiguous) and `fingerprint() -> str`; optionally `provided_labels() -> np.ndarray | None` (int64,
one per row): labels that came with the pool, used only to report pseudo-label agreement, never to
train. Providers open files lazily so that `fingerprint()` never reads a pool and handles never cross
a fork. `open_pool` applies the explicit conversions and the limit, then validates a few rows eagerly
so a wrong pool fails at startup with a fix, not hours into pseudo-labeling.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from data.labeled import LabeledSet, import_object
from data.pool_convert import CONVERSIONS, AdjustedPool, ordered_conversions, validate_pool  # noqa: F401 (CONVERSIONS re-exported)
from data.safe_pickle import safe_load
from pipeline.errors import UserError
from pipeline.fingerprint import array_digest, file_digest, fingerprint

ENTRY_POINT_GROUP = "rst_mart.pools"


@runtime_checkable
class Pool(Protocol):
    name: str

    def __len__(self) -> int: ...
    def read(self, start: int, stop: int) -> np.ndarray: ...
    def fingerprint(self) -> str: ...


# --- file-based providers -------------------------------------------------------------------------

class _FilePool:
    """Shared plumbing: path check, name, file fingerprint, and lazily loaded state dropped on pickling."""

    provider = ""

    def __init__(self, path: str, **options):
        self.path = Path(path)
        if not path or not self.path.exists():
            raise UserError(
                f"{self.provider} pool: {path or '(empty)'} does not exist; set pool.path to the pool's "
                f"{'folder' if self.provider == 'folder' else 'file'}."
            )
        self.name = f"{self.provider}:{self.path}"
        self._options = options
        self._loaded = None  # provider-specific, filled on first use

    def fingerprint(self) -> str:
        return fingerprint({"provider": self.provider, "file": file_digest(self.path), **self._options})

    def __len__(self) -> int:
        return len(self._images())

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self._images()[start:stop])

    def __getstate__(self) -> dict:
        # Spawned DataLoader workers reload from the file instead of receiving the pool through a pipe.
        return {**self.__dict__, "_loaded": None}

    def _images(self):
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded[0]

    def _load(self) -> tuple:  # -> (images, labels or None)
        raise NotImplementedError

    def provided_labels(self) -> np.ndarray | None:
        self._images()
        labels = self._loaded[1]
        if labels is None:
            return None
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (len(self),):
            raise UserError(
                f"{self.name}: the labels that come with the pool are {labels.dtype} {labels.shape}, expected "
                f"{len(self)} integers; fix or drop them."
            )
        return labels.astype(np.int64)


class RstPicklePool(_FilePool):
    """RST's ti_500K_pseudo_labeled.pickle: {"data": uint8 (N, 32, 32, 3), "extrapolated_targets": N ints}.

    A whole-file pickle is inherent to the format, so the first read loads all of it (through safe_load).
    """

    provider = "rst-pickle"

    def __init__(self, path: str):
        super().__init__(path)

    def _load(self) -> tuple:
        content = safe_load(self.path)
        if not isinstance(content, dict) or "data" not in content:
            raise UserError(
                f"{self.path} is not an RST pool pickle: expected a dict with a 'data' array (and optional "
                "'extrapolated_targets'); check pool.path or pick another pool.provider."
            )
        return np.asarray(content["data"]), content.get("extrapolated_targets")


class NpzPool(_FilePool):
    """DM-Improves-AT style .npz with `image` (N, H, W, C) uint8 and optional `label`.

    npz members cannot be memory-mapped, so the image array is read whole into memory once, at the
    first read. Pools larger than RAM should be converted to .npy (provider "npy") or HDF5 ("hdf5").
    """

    provider = "npz"

    def __init__(self, path: str, image_key: str = "image", label_key: str = "label"):
        super().__init__(path, image_key=image_key, label_key=label_key)
        self.image_key, self.label_key = image_key, label_key

    def _load(self) -> tuple:
        if not zipfile.is_zipfile(self.path):
            raise UserError(f"{self.path} is not a valid .npz (zip) file; check pool.path or pool.provider.")
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                if self.image_key not in npz.files:
                    raise UserError(
                        f"{self.path} has no array {self.image_key!r}; it holds {', '.join(npz.files) or 'nothing'}. "
                        "Set pool.image_key to the one with the images."
                    )
                images = npz[self.image_key]
                labels = npz[self.label_key] if self.label_key in npz.files else None
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise UserError(f"{self.path} cannot be read as .npz ({e}); the file is corrupt or holds pickled objects.") from None
        return images, labels


class NpyPool(_FilePool):
    """A .npy of images; reads copy only the requested rows. Optional .npy of labels.

    The memory map supplies the header (shape, dtype, data offset) only. Rows are read with plain file
    reads into fresh arrays: slicing the map would keep every page touched mapped into the process, so
    its resident size would grow with the pool (2.7x peak RSS at 500K vs 50K images, measured).
    """

    provider = "npy"

    def __init__(self, path: str, labels_path: str = ""):
        super().__init__(path, labels_path=labels_path)
        self.labels_path = Path(labels_path) if labels_path else None
        if self.labels_path is not None and not self.labels_path.is_file():
            raise UserError(f"npy pool: {labels_path} does not exist; fix pool.labels_path or remove it.")

    def fingerprint(self) -> str:
        labels = file_digest(self.labels_path) if self.labels_path else None
        return fingerprint({"provider": self.provider, "file": file_digest(self.path), "labels_file": labels})

    def read(self, start: int, stop: int) -> np.ndarray:
        mapped = self._images()
        stop = min(max(stop, 0), len(mapped))
        start = min(max(start, 0), stop)
        if not mapped.flags.c_contiguous:  # Fortran-order files: rare, copy through the map
            return np.ascontiguousarray(mapped[start:stop])
        row_items = int(np.prod(mapped.shape[1:]))
        with open(self.path, "rb") as f:
            rows = np.fromfile(f, dtype=mapped.dtype, count=(stop - start) * row_items,
                               offset=mapped.offset + start * row_items * mapped.dtype.itemsize)
        return rows.reshape(stop - start, *mapped.shape[1:])

    def _load(self) -> tuple:
        images = _load_npy(self.path, mmap_mode="r")
        labels = _load_npy(self.labels_path, mmap_mode=None) if self.labels_path else None
        return images, labels


def _load_npy(path: Path, mmap_mode: str | None) -> np.ndarray:
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npy array ({e}); check pool.path or pool.provider.") from None


class Hdf5Pool(_FilePool):
    """An HDF5 dataset of images (N, H, W, C), e.g. our own pseudolabels.h5; read slice by slice.

    The file is opened on first use in each process: h5py handles must not cross a fork, so a changed
    pid reopens it. Provided labels come from `labels_dataset`, or from `labels` when that exists.
    """

    provider = "hdf5"

    def __init__(self, path: str, dataset: str = "images", labels_dataset: str = ""):
        super().__init__(path, dataset=dataset, labels_dataset=labels_dataset)
        self.dataset, self.labels_dataset = dataset.lstrip("/"), labels_dataset.lstrip("/")
        self._pid = None

    def _images(self):
        if self._loaded is None or self._pid != os.getpid():
            self._loaded, self._pid = self._load(), os.getpid()
        return self._loaded[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        images = self._images()
        stop = min(stop, len(images))  # h5py rejects out-of-range and reversed slices
        start = min(start, stop)
        return np.ascontiguousarray(images[start:stop])

    def _load(self) -> tuple:
        import h5py

        if not h5py.is_hdf5(self.path):
            raise UserError(f"{self.path} is not an HDF5 file; check pool.path or pool.provider.")
        try:
            h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise UserError(f"{self.path} cannot be opened as HDF5 ({e}); the file is corrupt.") from None
        present = []
        h5.visititems(lambda name, obj: present.append(name) if isinstance(obj, h5py.Dataset) else None)
        if self.dataset not in present:
            h5.close()
            raise UserError(
                f"{self.path} has no dataset {self.dataset!r} (datasets present: {', '.join(present) or 'none'}); "
                "set pool.dataset to the one that holds the images (N, H, W, C)."
            )
        if self.labels_dataset and self.labels_dataset not in present:
            h5.close()
            raise UserError(
                f"{self.path} has no dataset {self.labels_dataset!r} (datasets present: {', '.join(present)}); "
                "fix pool.labels_dataset or remove it."
            )
        # Without an explicit labels_dataset, a `labels` vector matching the images (pseudolabels.h5) is used.
        images = h5[self.dataset]
        auto = "labels" in present and h5["labels"].shape == images.shape[:1]
        labels_name = self.labels_dataset or ("labels" if auto else "")
        # Labels are small (8 bytes per image), so they are read whole; images stay on disk.
        return images, (h5[labels_name][()] if labels_name else None)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_pid": None}


class FolderPool:
    """Image files under a folder (recursive, sorted by relative path), decoded by Pillow on read.

    Images keep their native channels ('L' -> C=1, 'RGB' -> C=3; other modes become RGB) so a
    mismatch with the labeled set is reported by open_pool rather than silently converted.
    """

    provider = "folder"

    def __init__(self, path: str, extensions: Sequence[str] = (".png", ".jpg", ".jpeg")):
        self.path = Path(path)
        if not path or not self.path.is_dir():
            raise UserError(f"folder pool: {path or '(empty)'} is not a directory; set pool.path to the image folder.")
        self.name = f"folder:{self.path}"
        self.extensions = tuple(e.lower() for e in extensions)
        files = sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                       if p.is_file() and p.suffix.lower() in self.extensions)
        stats = [(self.path / f).stat() for f in files]
        self._files = [(f, st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)]

    def __len__(self) -> int:
        return len(self._files)

    def fingerprint(self) -> str:
        return fingerprint({"provider": self.provider, "files": self._files, "extensions": self.extensions})

    def read(self, start: int, stop: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        decoded = []
        for relpath, _, _ in self._files[start:stop]:
            file = self.path / relpath
            try:
                with Image.open(file) as im:
                    im = im if im.mode in ("L", "RGB") else im.convert("RGB")
                    pixels = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise UserError(f"{file} cannot be decoded as an image ({e}); delete or replace it.") from None
            pixels = pixels[..., None] if pixels.ndim == 2 else pixels
            if decoded and pixels.shape != decoded[0].shape:
                raise UserError(
                    f"{file} is {pixels.shape} (H, W, C) but {self.path / self._files[start][0]} is "
                    f"{decoded[0].shape}; all images in a folder pool must share one size and mode: "
                    "convert them offline."
                )
            decoded.append(pixels)
        if not decoded:  # an empty range still has the pool's image shape
            return self.read(0, 1)[:0] if self._files else np.empty((0, 0, 0, 0), dtype=np.uint8)
        return np.stack(decoded)


class LabeledRemainderPool:
    """The labeled set's training images that were not kept as labels; their true labels are provided."""

    provider = "labeled-remainder"

    def __init__(self, labeled: LabeledSet, remainder_index: np.ndarray):
        if len(remainder_index) == 0:
            raise UserError(
                "pool.provider = \"labeled-remainder\" but data.num_labeled uses the whole training set, so "
                "there is nothing left to pseudo-label; lower data.num_labeled or choose another pool.provider."
            )
        self.name = f"labeled-remainder:{labeled.name}"
        self._labeled = labeled
        self._index = np.asarray(remainder_index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._index)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._labeled.train_images[self._index[start:stop]]  # fancy indexing copies: contiguous

    def fingerprint(self) -> str:
        return fingerprint({"provider": self.provider, "labeled": self._labeled.fingerprint(),
                            "remainder_index": array_digest(self._index)})

    def provided_labels(self) -> np.ndarray:
        return self._labeled.train_labels[self._index]


BUILTIN_PROVIDERS: dict[str, Callable[..., Pool]] = {
    "rst-pickle": RstPicklePool,
    "npz": NpzPool,
    "npy": NpyPool,
    "hdf5": Hdf5Pool,
    "folder": FolderPool,
    "labeled-remainder": LabeledRemainderPool,
}
# Built from the run's labeled split rather than from [pool] keys.
_CONTEXT_PROVIDERS = {"labeled-remainder"}


# --- open_pool: resolve, construct, convert, limit, validate ---------------------------------------

def pool_identity(provider: str, options: dict) -> str:
    """A file or plugin pool's own fingerprint, from constructing it (headers only; no rows read)."""
    options = {k: v for k, v in options.items() if not (k == "path" and v in ("", None))}
    return _construct(_resolve_provider(provider), options, provider).fingerprint()


def open_pool(provider: str, options: dict, *, labeled: LabeledSet, remainder_index: np.ndarray,
              limit: int = 0, convert: Sequence[str] = (), cache_dir=None) -> Pool:
    """Build the pool named by `provider` from the [pool] `options`, apply `convert` and `limit`, and
    check its first rows against `labeled` (dtype uint8, image shape) so mistakes surface with a fix."""
    # An empty path is the config's "unset" (labeled-remainder needs none), not a path to check.
    options = {k: v for k, v in options.items() if not (k == "path" and v in ("", None))}
    factory = _resolve_provider(provider)
    if provider in _CONTEXT_PROVIDERS:
        if options:
            raise UserError(
                f"pool.provider = {provider!r} takes no options, but the config sets "
                f"{', '.join('pool.' + k for k in options)}; remove them."
            )
        pool = factory(labeled=labeled, remainder_index=remainder_index)
    else:
        pool = _construct(factory, options, provider)
    if not isinstance(pool, Pool):
        raise UserError(
            f"pool.provider = {provider!r} returned {type(pool).__name__}, which lacks name, __len__, read or "
            "fingerprint; fix the provider so it returns a pool."
        )
    conversions = ordered_conversions(convert)
    if limit < 0:
        raise UserError(f"pool.limit = {limit} is negative; use 0 for the whole pool.")
    if conversions or limit:
        pool = AdjustedPool(pool, conversions, limit, labeled.image_shape)
    validate_pool(pool, labeled, conversions)
    return pool


def _resolve_provider(provider: str) -> Callable[..., Pool]:
    if provider in BUILTIN_PROVIDERS:
        return BUILTIN_PROVIDERS[provider]
    if ":" in provider:
        return import_object(provider, "pool.provider")
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if provider in entry_points:
        try:
            return entry_points[provider].load()
        except (ImportError, AttributeError) as e:
            raise UserError(
                f"pool.provider = {provider!r}: entry point {entry_points[provider].value!r} in group "
                f"{ENTRY_POINT_GROUP} cannot be loaded ({e}); reinstall the package that provides it."
            ) from None
    raise UserError(
        f"pool.provider = {provider!r} is unknown; built-in providers are {', '.join(BUILTIN_PROVIDERS)}; "
        f"installed plugins ({ENTRY_POINT_GROUP} entry points): {', '.join(sorted(entry_points)) or 'none'}; "
        "or give \"package.module:factory\"."
    )


def _construct(factory: Callable[..., Pool], options: dict, provider: str) -> Pool:
    """factory(**options), with unknown or missing keys reported as config mistakes, not tracebacks."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature: let the call itself complain
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unexpected = [k for k in options if k not in accepted]
        if unexpected:
            raise UserError(
                f"pool.provider = {provider!r} does not take pool.{unexpected[0]}; it accepts "
                f"{', '.join('pool.' + n for n in accepted) or 'no options'}. Remove the key or fix its spelling."
            )
        missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in options]
        if missing:
            raise UserError(f"pool.provider = {provider!r} needs pool.{missing[0]}; set it in the [pool] section.")
        return factory(**options)
    try:
        return factory(**options)
    except TypeError as e:
        raise UserError(f"pool.provider = {provider!r} rejected the [pool] options ({e}); fix the keys.") from None
