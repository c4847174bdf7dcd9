"""Unlabeled pools: the provider protocol, the registry, the built-in providers and `open_pool`.

A pool is any object with `name: str`, `__len__()`, `read(start, stop) -> np.ndarray` (uint8 NHWC,
C-contiguous) and `fingerprint() -> str`; optionally `provided_labels() -> np.ndarray | None` (int64,
one per row): labels that came with the pool, used only to report pseudo-label agreement, never to
train. File providers take one file, a glob or a list of files read as one pool (data/pool_files.py),
never hold the images in memory, and open files lazily so that `fingerprint()` reads no rows (file
digests come from pipeline.core.fingerprint's cache). `open_pool` applies
the explicit conversions and the limit, then validates a few rows eagerly so a wrong pool fails at
startup with a fix, not hours into pseudo-labeling.
"""
from __future__ import annotations

import importlib.metadata
import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from data.labeled import LabeledSet, import_object
from data.pool_convert import CONVERSIONS, AdjustedPool, ordered_conversions, validate_pool  # noqa: F401 (CONVERSIONS re-exported)
from data.pool_files import ConcatenatedParts, Hdf5Part, RawArrayPart, open_npy_part, open_npz_part, resolve_pool_paths
from data.rst_pickle import convert_rst_pickle
from data.sources import GENERATED
from pipeline.core.errors import UserError
from pipeline.core.fingerprint import array_digest, file_digest, fingerprint, user_cache_dir

ENTRY_POINT_GROUP = "rst_mart.pools"


@runtime_checkable
class Pool(Protocol):
    name: str

    def __len__(self) -> int: ...
    def read(self, start: int, stop: int) -> np.ndarray: ...
    def fingerprint(self) -> str: ...


# --- file-based providers -------------------------------------------------------------------------

class _FilePool:
    """A pool in one file or several read in order (`path`: a file, a glob, or a list of either).

    Construction only names and stats the files; `fingerprint()` is their digests (cached across
    processes by pipeline.core.fingerprint) and the options that change the rows, so it reads no rows;
    `len()` reads the parts' headers; `read` reads just the rows asked for. Parts are opened on first use."""

    provider = ""

    def __init__(self, path, **options):
        self.paths = resolve_pool_paths(path, self.provider)
        spec = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ", ".join(map(os.fspath, path))
        self.name = f"{self.provider}:{spec}"
        self._options = options  # the ones that change rows or provided labels: part of the fingerprint
        self._parts = None

    def fingerprint(self) -> str:
        return fingerprint({"provider": self.provider, **self._file_digests(), **self._options})

    def _file_digests(self) -> dict:
        digests = [file_digest(p) for p in self.paths]
        return {"file": digests[0]} if len(digests) == 1 else {"files": digests}

    def __len__(self) -> int:
        return len(self._opened())

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._opened().read(start, stop)

    def provided_labels(self) -> np.ndarray | None:
        labels = self._labels()
        if labels is None:
            return None
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu" or labels.shape != (len(self),):
            raise UserError(
                f"{self.name}: the labels that come with the pool are {labels.dtype} {labels.shape}, expected "
                f"{len(self)} integers; fix or drop them."
            )
        return labels.astype(np.int64)

    def _labels(self) -> np.ndarray | None:
        return self._opened().labels()

    def _opened(self) -> ConcatenatedParts:
        if self._parts is None:
            self._parts = ConcatenatedParts([self._open_part(p) for p in self.paths], self.provider)
        return self._parts

    def _open_part(self, path: Path):
        raise NotImplementedError


class RstPicklePool(_FilePool):
    """RST's ti_500K_pseudo_labeled.pickle: {"data": uint8 (N, 32, 32, 3), "extrapolated_targets": N ints}.

    Unpickling is the only way to read a pickle, so the first read converts each pickle once into
    uncompressed .npy files in `cache_dir` (data/rst_pickle.py, which says how much RAM that takes),
    named by the pickle's digest; later reads, and later runs, read those in place."""

    provider = "rst-pickle"

    def __init__(self, path, cache_dir: str | os.PathLike | None = None):
        super().__init__(path)
        self.cache_dir = Path(cache_dir) if cache_dir else user_cache_dir() / "pools"

    def _open_part(self, path: Path) -> RawArrayPart:
        images_path, labels_path = convert_rst_pickle(path, self.cache_dir)
        return open_npy_part(images_path, labels_path and (lambda: np.load(labels_path, allow_pickle=False)))


class NpzPool(_FilePool):
    """DM-Improves-AT style .npz with `image` (N, H, W, C) uint8 and optional `label`; one file or parts.

    Nothing is read whole: a member stored by np.savez is read in place at its offset in the zip; one
    deflated by np.savez_compressed is decompressed as a stream (fast in row order, slow at random:
    see data/pool_files.py DeflatedMemberPart). The length comes from the members' .npy headers."""

    provider = "npz"

    def __init__(self, path, image_key: str = "image", label_key: str = "label"):
        super().__init__(path, image_key=image_key, label_key=label_key)
        self.image_key, self.label_key = image_key, label_key

    def _open_part(self, path: Path):
        return open_npz_part(path, self.image_key, self.label_key)


class NpyPool(_FilePool):
    """.npy files of images (one or parts) read in place, rows copied on read; optional .npy of labels
    (`labels_path`: a file, glob or list like `path`; the label files end to end cover the pool)."""

    provider = "npy"

    def __init__(self, path, labels_path=""):
        super().__init__(path)
        self.labels_paths = resolve_pool_paths(labels_path, "npy", "pool.labels_path") if labels_path else []

    def fingerprint(self) -> str:
        labels = [file_digest(p) for p in self.labels_paths]
        return fingerprint({"provider": self.provider, **self._file_digests(),
                            "labels_file": (labels[0] if len(labels) == 1 else labels) or None})

    def _open_part(self, path: Path) -> RawArrayPart:
        return open_npy_part(path)

    def _labels(self) -> np.ndarray | None:
        if not self.labels_paths:
            return None
        arrays = []
        for path in self.labels_paths:
            try:
                arrays.append(np.load(path, allow_pickle=False))
            except (ValueError, OSError) as e:
                raise UserError(f"{path} is not a readable .npy array ({e}); fix pool.labels_path.") from None
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class Hdf5Pool(_FilePool):
    """An HDF5 dataset of images (N, H, W, C) in one file or parts, e.g. our own pseudolabels.h5; read slice
    by slice. Provided labels come from `labels_dataset`, or from `labels` when that exists."""

    provider = "hdf5"

    def __init__(self, path, dataset: str = "images", labels_dataset: str = ""):
        super().__init__(path, dataset=dataset, labels_dataset=labels_dataset)
        self.dataset, self.labels_dataset = dataset.lstrip("/"), labels_dataset.lstrip("/")

    def _open_part(self, path: Path) -> Hdf5Part:
        return Hdf5Part(path, self.dataset, self.labels_dataset)


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


def unused_pool_options(provider: str, options: dict) -> tuple[list[str], list[str]]:
    """For a built-in provider, the [pool] `options` it does not take and the ones it does, without
    constructing it (so a config check can refuse them before any stage runs). Plugins are checked
    when constructed, by `_construct`: ([], []) here."""
    options = {k: v for k, v in options.items() if not (k == "path" and v in ("", None))}
    if provider == GENERATED:
        return list(options), []
    if provider not in BUILTIN_PROVIDERS:
        return [], []
    accepted = [] if provider in _CONTEXT_PROVIDERS else _keywords(BUILTIN_PROVIDERS[provider]) or []
    return [k for k in options if k not in accepted], accepted


def open_pool(provider: str, options: dict, *, labeled: LabeledSet, remainder_index: np.ndarray,
              limit: int = 0, convert: Sequence[str] = (), cache_dir: str | os.PathLike | None = None) -> Pool:
    """Build the pool named by `provider` from the [pool] `options`, apply `convert` and `limit`, and
    check its first rows against `labeled` (dtype uint8, image shape) so mistakes surface with a fix.

    `cache_dir` is where a provider that must convert its files before reading them (rst-pickle) keeps
    the converted copy; it goes to any provider whose factory takes a `cache_dir` keyword, unless the
    [pool] section sets pool.cache_dir itself. None: the user cache dir (pipeline.core.fingerprint)."""
    # An empty path is the config's "unset" (labeled-remainder needs none), not a path to check.
    options = {k: v for k, v in options.items() if not (k == "path" and v in ("", None))}
    factory = _resolve_provider(provider)
    if provider in _CONTEXT_PROVIDERS:
        if options:
            raise UserError(
                f"pool.provider = {provider!r} takes no options, but the config sets "
                f"{', '.join('pool.' + k for k in options)}; remove them, or choose the provider that reads "
                "them (e.g. pool.provider=npz for a pool.path of .npz files)."
            )
        pool = factory(labeled=labeled, remainder_index=remainder_index)
    else:
        if cache_dir is not None and "cache_dir" not in options and _takes_keyword(factory, "cache_dir"):
            options = {**options, "cache_dir": cache_dir}
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


def _takes_keyword(factory: Callable, name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params and params[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                    inspect.Parameter.KEYWORD_ONLY)


def _keywords(factory: Callable) -> list[str] | None:
    """The keyword arguments `factory` takes, or None when it takes any (**kwargs) or cannot be inspected."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _construct(factory: Callable[..., Pool], options: dict, provider: str) -> Pool:
    """factory(**options), with unknown or missing keys reported as config mistakes, not tracebacks."""
    accepted = _keywords(factory)  # None: no introspectable signature, or **kwargs: let the call complain
    if accepted is not None:
        params = inspect.signature(factory).parameters
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
