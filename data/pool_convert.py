"""Explicit pool conversions (never applied silently) and the eager check of a pool's first rows.

A pool whose images differ from the labeled set (float pixels, channels-first, grayscale, another
size) is refused with the conversion that would fix it; listing that conversion in `pool.convert`
applies it, and the conversions and the row limit enter the pool's fingerprint.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.fingerprint import fingerprint

if TYPE_CHECKING:
    from data.labeled import LabeledSet
    from data.pools import Pool

# Applied in this order whatever the order in pool.convert: layout, then dtype, then channels, then size.
CONVERSIONS = ("nchw-to-nhwc", "float-to-uint8", "gray-to-rgb", "rgb-to-gray", "resize")
_VALIDATION_ROWS = 8  # rows read by open_pool to check dtype and shape before any work starts


def ordered_conversions(convert: Sequence[str]) -> tuple[str, ...]:
    requested = [convert] if isinstance(convert, str) else list(convert)
    unknown = [c for c in requested if c not in CONVERSIONS]
    if unknown:
        raise UserError(f"pool.convert has unknown conversion {unknown[0]!r}; choose from {', '.join(CONVERSIONS)}.")
    if "gray-to-rgb" in requested and "rgb-to-gray" in requested:
        raise UserError("pool.convert has both gray-to-rgb and rgb-to-gray; keep the one the labeled set needs.")
    return tuple(c for c in CONVERSIONS if c in requested)


class AdjustedPool:
    """A pool seen through explicit conversions and a row limit; both are part of its fingerprint."""

    def __init__(self, inner: Pool, conversions: tuple[str, ...], limit: int, target_shape: tuple[int, int, int]):
        self.inner, self.conversions, self.limit = inner, conversions, limit
        self.name = inner.name
        self.target_hw = tuple(target_shape[:2])
        self._len = min(len(inner), limit) if limit else len(inner)

    def __len__(self) -> int:
        return self._len

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self._len)
        images = self.inner.read(min(start, stop), stop)
        for step in self.conversions:
            images = _CONVERTERS[step](images, self)
        return np.ascontiguousarray(images)

    def fingerprint(self) -> str:
        resize_to = list(self.target_hw) if "resize" in self.conversions else None
        return fingerprint({"inner": self.inner.fingerprint(), "convert": list(self.conversions),
                            "limit": self.limit, "resize_to": resize_to})

    def provided_labels(self) -> np.ndarray | None:
        labels = getattr(self.inner, "provided_labels", lambda: None)()
        return None if labels is None else labels[: self._len]


def _nchw_to_nhwc(images: np.ndarray, pool: AdjustedPool) -> np.ndarray:
    if images.ndim != 4:
        raise UserError(f"pool {pool.name}: nchw-to-nhwc needs 4-d images but they are {images.shape}; remove it.")
    return images.transpose(0, 2, 3, 1)


def _float_to_uint8(images: np.ndarray, pool: AdjustedPool) -> np.ndarray:
    if images.dtype.kind != "f":
        raise UserError(f"pool {pool.name}: pool.convert has float-to-uint8 but the images are {images.dtype}; "
                        "remove it.")
    # NaN fails both comparisons, so it is refused too.
    if not (np.all(images >= 0) and np.all(images <= 1)):
        raise UserError(
            f"pool {pool.name}: float-to-uint8 expects values in [0, 1] but found [{np.nanmin(images)}, "
            f"{np.nanmax(images)}]; rescale the pool offline (values in 0..255 only need .astype(np.uint8))."
        )
    return np.rint(images * 255).astype(np.uint8)


def _require_uint8(images: np.ndarray, pool: AdjustedPool, step: str) -> None:
    if images.dtype != np.uint8:
        raise UserError(f"pool {pool.name}: {step} works on uint8 images but they are {images.dtype}; "
                        "add \"float-to-uint8\" to pool.convert if they are floats in [0, 1].")


def _gray_to_rgb(images: np.ndarray, pool: AdjustedPool) -> np.ndarray:
    if images.shape[-1] != 1:
        raise UserError(f"pool {pool.name}: gray-to-rgb needs 1 channel but the images are {images.shape}; remove it.")
    return np.repeat(images, 3, axis=-1)


def _rgb_to_gray(images: np.ndarray, pool: AdjustedPool) -> np.ndarray:
    if images.shape[-1] != 3:
        raise UserError(f"pool {pool.name}: rgb-to-gray needs 3 channels but the images are {images.shape}; remove it.")
    _require_uint8(images, pool, "rgb-to-gray")
    # ITU-R 601-2 luma in Pillow's fixed-point form, so results equal Image.convert("L").
    rgb = images.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def _resize(images: np.ndarray, pool: AdjustedPool) -> np.ndarray:
    from PIL import Image

    _require_uint8(images, pool, "resize")
    height, width = pool.target_hw
    if images.shape[1:3] == (height, width):
        return images
    out = np.empty((len(images), height, width, images.shape[3]), dtype=np.uint8)
    for i, image in enumerate(images):
        for c in range(images.shape[3]):  # per channel as 'L': works for any channel count
            out[i, :, :, c] = np.asarray(Image.fromarray(image[:, :, c]).resize((width, height), Image.BILINEAR))
    return out


_CONVERTERS = {"nchw-to-nhwc": _nchw_to_nhwc, "float-to-uint8": _float_to_uint8, "gray-to-rgb": _gray_to_rgb,
               "rgb-to-gray": _rgb_to_gray, "resize": _resize}


def validate_pool(pool: Pool, labeled: LabeledSet, conversions: tuple[str, ...]) -> None:
    """Read the first rows and refuse anything the stages would otherwise silently misread."""
    size = len(pool)
    if size == 0:
        raise UserError(f"pool {pool.name} is empty; point pool.path at a pool with images (or raise pool.limit).")
    wanted = min(size, _VALIDATION_ROWS)
    sample = pool.read(0, wanted)
    if not isinstance(sample, np.ndarray) or sample.ndim != 4 or len(sample) != wanted:
        described = f"{sample.dtype} {sample.shape}" if isinstance(sample, np.ndarray) else type(sample).__name__
        raise UserError(
            f"pool {pool.name}: read(0, {wanted}) gave {described}, not {wanted} images (N, H, W, C); convert "
            "the pool offline to a uint8 (N, H, W, C) array."
        )
    target = labeled.image_shape
    shape, fixes, unfixable = sample.shape[1:], [], []
    if shape[0] in (1, 3) and shape[2] not in (1, 3):  # (C, H, W) read as (H, W, C)
        fixes.append("nchw-to-nhwc")
        shape = (shape[1], shape[2], shape[0])
    if sample.dtype.kind == "f":
        fixes.append("float-to-uint8")
    elif sample.dtype != np.uint8:
        unfixable.append(str(sample.dtype))
    if shape[2] != target[2]:
        fix = {(1, 3): "gray-to-rgb", (3, 1): "rgb-to-gray"}.get((shape[2], target[2]))
        (fixes if fix else unfixable).append(fix or f"{shape[2]} channels")
    if shape[:2] != target[:2]:
        fixes.append("resize")
    if not fixes and not unfixable:
        if not sample.flags.c_contiguous:
            raise UserError(f"pool {pool.name}: read() returned a non-contiguous array; the provider must return "
                            "np.ascontiguousarray(...).")
        return
    layout = " (it looks channels-first, N, C, H, W)" if "nchw-to-nhwc" in fixes else ""
    found = f"pool {pool.name} gives {sample.dtype} images of shape {sample.shape[1:]}{layout}, but the labeled " \
            f"set {labeled.name} has uint8 images of shape {target} (H, W, C)"
    if unfixable:
        raise UserError(f"{found}; no built-in conversion handles {', '.join(unfixable)}: convert the pool offline "
                        "to uint8 (N, H, W, C) with the labeled set's channels.")
    # A fix whose inverse is already configured means that conversion was the mistake: drop it instead.
    inverse = {"nchw-to-nhwc": "nchw-to-nhwc", "gray-to-rgb": "rgb-to-gray", "rgb-to-gray": "gray-to-rgb"}
    dropped = {inverse[f] for f in fixes if inverse.get(f) in conversions}
    added = {f for f in fixes if inverse.get(f) not in conversions}
    suggested = [c for c in CONVERSIONS if (c in conversions and c not in dropped) or c in added]
    listed = ", ".join(f'"{c}"' for c in suggested)
    why = f"without {', '.join(sorted(dropped))}, which causes the mismatch" if dropped else "to convert explicitly"
    raise UserError(f"{found}; set pool.convert = [{listed}] ({why}).")
