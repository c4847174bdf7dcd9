"""The labeled dataset: Fashion-MNIST, CIFAR-10 or a user's `package.module:function`, as uint8 NHWC.

Everything is read into memory (70k tiny images at most for the built-ins) and checked by
`validate_labeled` before anyone sees it, so stages can trust shapes, dtypes and label ranges.
"""
from __future__ import annotations

import functools
import gzip
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.safe_pickle import safe_load
from pipeline.core.errors import UserError
from pipeline.core.fingerprint import array_digest, fingerprint

BUILTIN_DATASETS = ("fashion-mnist", "cifar10")

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Where Debian's `dataset-fashion-mnist` package puts the gzipped idx files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim

CIFAR10_DIR_NAME = "cifar-10-batches-py"
_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_PIXELS = 3 * 32 * 32

_USER_SET_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


@dataclass(frozen=True, eq=False)
class LabeledSet:
    """One labeled dataset in memory. The arrays are treated as immutable: the fingerprint is cached."""

    name: str
    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray  # uint8 (M, H, W, C)
    test_labels: np.ndarray  # int64 (M,)
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    @functools.cached_property
    def _content_digest(self) -> str:
        # cached_property writes straight into __dict__, which a frozen dataclass (without slots) allows.
        arrays = array_digest(self.train_images, self.train_labels, self.test_images, self.test_labels)
        return fingerprint({"arrays": arrays, "class_names": list(self.class_names)})

    def fingerprint(self) -> str:
        """sha256 over the four arrays and the class names (not the name: content is what matters)."""
        return self._content_digest


def load_labeled(dataset: str, root: str = "", download: bool = False) -> LabeledSet:
    """Load `dataset` ("fashion-mnist", "cifar10" or "package.module:function") and validate it."""
    if dataset == "fashion-mnist":
        labeled, source = _load_fashion_mnist(root, download)
    elif dataset == "cifar10":
        labeled, source = _load_cifar10(root, download)
    elif ":" in dataset:
        labeled, source = _load_user_set(dataset, root), f"data.dataset = {dataset!r}"
    else:
        raise UserError(
            f"data.dataset = {dataset!r} is not a known dataset; choose one of "
            f"{', '.join(BUILTIN_DATASETS)}, or give \"package.module:function\" for your own set."
        )
    validate_labeled(labeled, source)
    return labeled


def dataset_files(dataset: str, root: str = "") -> list[Path] | None:
    """The files `load_labeled` would read for a built-in dataset, in the same search order, or None
    (a user's set, or files not there yet): what the labeled set's fingerprint digests without loading."""
    if dataset == "fashion-mnist":
        user_dirs = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root else []
        candidates = [Path(FASHION_MNIST_SYSTEM_DIR)] + user_dirs
        files = next((f for f in map(_fashion_mnist_files, candidates) if f is not None), None)
        return [files[key] for key in _FASHION_MNIST_FILES] if files else None
    if dataset == "cifar10":
        batch_dir = _find_cifar10_dir(root)
        names = (*_CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta")
        if batch_dir is None or not all((batch_dir / n).is_file() for n in names):
            return None
        return [batch_dir / n for n in names]
    return None


def labeled_split(train_labels: np.ndarray, num_labeled: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced labeled subset: (labeled_index, remainder_index), both sorted int64.

    Each class gets num_labeled // K images and the first num_labeled % K classes one more, drawn with
    np.random.default_rng(seed). num_labeled == 0 or >= N keeps the whole training split labeled.
    """
    n = len(train_labels)
    if num_labeled < 0:
        raise UserError(f"data.num_labeled = {num_labeled} is negative; use 0 for the whole training set.")
    if num_labeled == 0 or num_labeled >= n:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    num_classes = int(train_labels.max()) + 1
    per_class, leftover = divmod(num_labeled, num_classes)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        wanted = per_class + (1 if c < leftover else 0)
        members = np.flatnonzero(train_labels == c)
        if wanted > len(members):
            raise UserError(
                f"data.num_labeled = {num_labeled} asks for {wanted} images of class {c}, but the training "
                f"split has only {len(members)}; lower data.num_labeled (or use 0 for all images)."
            )
        chosen.append(rng.permutation(members)[:wanted])
    labeled_index = np.sort(np.concatenate(chosen)).astype(np.int64)
    remainder_index = np.setdiff1d(np.arange(n, dtype=np.int64), labeled_index)
    return labeled_index, remainder_index


def validate_labeled(ls: LabeledSet, source: str) -> None:
    """Check dtypes, shapes, label ranges and train/test agreement; violations raise UserError naming `source`."""
    num_classes = len(ls.class_names)
    if num_classes == 0:
        raise UserError(f"{source}: class_names is empty; give one name per class.")
    for split in ("train", "test"):
        images, labels = getattr(ls, f"{split}_images"), getattr(ls, f"{split}_labels")
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            described = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
            raise UserError(
                f"{source}: {split}_images is {described}; rst-mart needs a uint8 array (N, H, W, C) with "
                "pixel values 0..255 (convert float images in [0, 1] with np.round(x * 255).astype(np.uint8))."
            )
        if images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
            raise UserError(
                f"{source}: {split}_images has shape {images.shape}, which looks channels-first (N, C, H, W); "
                "transpose it to (N, H, W, C) with images.transpose(0, 2, 3, 1)."
            )
        if len(images) == 0:
            raise UserError(f"{source}: {split}_images is empty; both splits need at least one image.")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.shape != (len(images),):
            described = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
            raise UserError(
                f"{source}: {split}_labels is {described}; it must be int64 with one label per image "
                f"({len(images)} images)."
            )
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(
                f"{source}: {split}_labels range over [{labels.min()}, {labels.max()}] but there are "
                f"{num_classes} class names, so labels must lie in [0, {num_classes}); fix the labels or "
                "the class names."
            )
    if ls.train_images.shape[1:] != ls.test_images.shape[1:]:
        raise UserError(
            f"{source}: train images are {ls.train_images.shape[1:]} but test images are "
            f"{ls.test_images.shape[1:]} (H, W, C); both splits must share one image shape."
        )


def import_object(spec: str, config_key: str) -> Any:
    """Resolve "package.module:attr" (used for user datasets here and pool factories in data.pools)."""
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise UserError(f"{config_key} = {spec!r} must look like \"package.module:function\".")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(
            f"{config_key} = {spec!r}: cannot import module {module_name!r} ({e}); install the package "
            "or put its directory on PYTHONPATH."
        ) from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise UserError(f"{config_key} = {spec!r}: module {module_name!r} has no attribute {attr_path!r}.")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise UserError(f"{config_key} = {spec!r}: {attr_path!r} is not callable.")
    return obj


# --- Fashion-MNIST --------------------------------------------------------------------------------

def _load_fashion_mnist(root: str, download: bool) -> tuple[LabeledSet, str]:
    candidates = [Path(FASHION_MNIST_SYSTEM_DIR)]
    if root:
        candidates += [Path(root), Path(root) / "FashionMNIST" / "raw"]
    files = next((f for f in map(_fashion_mnist_files, candidates) if f is not None), None)
    if files is None and download:
        raw_dir = _download_fashion_mnist(root)
        files = _fashion_mnist_files(raw_dir)
    if files is None:
        raise UserError(
            f"Fashion-MNIST not found: looked in {', '.join(map(str, candidates))} for "
            f"{', '.join(_FASHION_MNIST_FILES.values())} (optionally .gz). Install it with "
            "`apt-get install -y dataset-fashion-mnist`, or set data.root to a directory holding the four "
            "idx files, or set data.download = true."
        )
    train_images = _read_idx(files["train_images"], _IDX_IMAGES_MAGIC)[..., None]
    test_images = _read_idx(files["test_images"], _IDX_IMAGES_MAGIC)[..., None]
    labeled = LabeledSet(
        name="fashion-mnist",
        train_images=train_images,
        train_labels=_read_idx(files["train_labels"], _IDX_LABELS_MAGIC).astype(np.int64),
        test_images=test_images,
        test_labels=_read_idx(files["test_labels"], _IDX_LABELS_MAGIC).astype(np.int64),
        class_names=FASHION_MNIST_CLASSES,
    )
    return labeled, f"Fashion-MNIST in {files['train_images'].parent}"


def _fashion_mnist_files(directory: Path) -> dict[str, Path] | None:
    """The four idx files in `directory` (plain or .gz), or None unless all four are there."""
    found = {}
    for key, base in _FASHION_MNIST_FILES.items():
        path = next((p for p in (directory / base, directory / f"{base}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _download_fashion_mnist(root: str) -> Path:
    if not root:
        raise UserError("data.download = true needs data.root: set it to the directory to download Fashion-MNIST into.")
    import torchvision  # only needed for downloading

    try:
        torchvision.datasets.FashionMNIST(root, train=True, download=True)
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"downloading Fashion-MNIST into {root} failed ({e}); check the network, or install it with "
            "`apt-get install -y dataset-fashion-mnist`."
        ) from None
    return Path(root) / "FashionMNIST" / "raw"


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse an idx file (big-endian header: magic, then one uint32 per dimension, then uint8 data)."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path} cannot be read ({e}); the file is truncated or corrupt: "
                        "reinstall or re-download it.") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if magic != expected_magic:
        raise UserError(
            f"{path} is not an idx file of the expected kind (magic number {magic}, expected "
            f"{expected_magic}); check that the Fashion-MNIST files are not swapped or corrupt."
        )
    ndim = magic & 0xFF
    header_bytes = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header_bytes], dtype=">u4")) if len(raw) >= header_bytes else ()
    if len(dims) != ndim or len(raw) - header_bytes != int(np.prod(dims)):
        raise UserError(
            f"{path} is truncated or corrupt: its header declares shape {dims} but it holds "
            f"{max(len(raw) - header_bytes, 0)} data bytes; reinstall or re-download it."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()


# --- CIFAR-10 -------------------------------------------------------------------------------------

def _load_cifar10(root: str, download: bool) -> tuple[LabeledSet, str]:
    batch_dir = _find_cifar10_dir(root)
    if batch_dir is None and download:
        batch_dir = _download_cifar10(root)
    if batch_dir is None:
        expected = Path(root) / CIFAR10_DIR_NAME if root else Path(CIFAR10_DIR_NAME)
        raise UserError(
            f"CIFAR-10 not found: expected the official python batches in {expected} (data_batch_1..5, "
            "test_batch, batches.meta). Set data.root to the directory that contains cifar-10-batches-py "
            "(or to that directory itself), or set data.download = true to fetch it."
        )
    train = [_read_cifar10_batch(batch_dir / name) for name in _CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _read_cifar10_batch(batch_dir / "test_batch")
    labeled = LabeledSet(
        name="cifar10",
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        class_names=_read_cifar10_class_names(batch_dir / "batches.meta"),
    )
    return labeled, f"CIFAR-10 in {batch_dir}"


def _find_cifar10_dir(root: str) -> Path | None:
    if not root:
        return None
    for directory in (Path(root) / CIFAR10_DIR_NAME, Path(root)):
        if (directory / "batches.meta").is_file():
            return directory
    return None


def _download_cifar10(root: str) -> Path:
    if not root:
        raise UserError("data.download = true needs data.root: set it to the directory to download CIFAR-10 into.")
    # Only torchvision's downloader: its CIFAR10 class would unpickle the batches with plain pickle.
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(CIFAR10.url, root, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    except (OSError, RuntimeError) as e:
        raise UserError(
            f"downloading CIFAR-10 into {root} failed ({e}); check the network, or download "
            f"{CIFAR10.url} yourself, extract it and set data.root to where it is."
        ) from None
    return Path(root) / CIFAR10_DIR_NAME


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch: `data` uint8 (n, 3072) in CHW order and `labels` (n ints) -> NHWC uint8, int64."""
    if not path.is_file():
        raise UserError(f"{path} is missing; the CIFAR-10 directory is incomplete: re-extract or re-download it.")
    batch = safe_load(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise UserError(f"{path} is not a CIFAR-10 batch (a dict with 'data' and 'labels'); re-download it.")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR10_PIXELS:
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path}: 'data' is {described}, expected uint8 (n, {_CIFAR10_PIXELS}); re-download it.")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: 'labels' is not a list of integers; re-download it.") from None
    if labels.shape != (len(data),):
        raise UserError(f"{path}: {len(data)} images but 'labels' has shape {labels.shape}; re-download it.")
    if len(labels) and (labels.min() < 0 or labels.max() >= 10):
        raise UserError(
            f"{path}: labels range over [{labels.min()}, {labels.max()}] but CIFAR-10 labels lie in [0, 10); "
            "the file is corrupt or not CIFAR-10: re-download it."
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_cifar10_class_names(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise UserError(f"{path} is missing; the CIFAR-10 directory is incomplete: re-extract or re-download it.")
    meta = safe_load(path)
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        raise UserError(f"{path} has no list of 10 'label_names'; re-download CIFAR-10.")
    return tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)


# --- user sets ------------------------------------------------------------------------------------

def _load_user_set(spec: str, root: str) -> LabeledSet:
    make = import_object(spec, "data.dataset")
    result = make(root=root)
    if not isinstance(result, Mapping):
        raise UserError(
            f"data.dataset = {spec!r} returned {type(result).__name__}; it must return a dict with keys "
            f"{', '.join(_USER_SET_KEYS)}."
        )
    missing = [k for k in _USER_SET_KEYS if k not in result]
    if missing:
        raise UserError(f"data.dataset = {spec!r} returned a dict without {', '.join(missing)}; add them.")
    labels = {}
    for split in ("train", "test"):
        values = np.asarray(result[f"{split}_labels"])
        if values.dtype.kind not in "iu":
            raise UserError(
                f"data.dataset = {spec!r}: {split}_labels has dtype {values.dtype}; labels must be integers."
            )
        labels[split] = values.astype(np.int64)
    return LabeledSet(
        name=spec,
        train_images=np.asarray(result["train_images"]),
        train_labels=labels["train"],
        test_images=np.asarray(result["test_images"]),
        test_labels=labels["test"],
        class_names=tuple(str(c) for c in result["class_names"]),
    )
