"""Batch augmentations as tensor ops on the batch's device (airbench style: no per-image Python loop)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def augmenter(enabled: bool, image_size: int) -> Callable[[Tensor, torch.Generator], Tensor] | None:
    """The training augmentation of both training stages: random crop after zero padding of image_size // 8
    (4 at 32 px as in the references; 3 at 28 px) and a horizontal flip; None when disabled."""
    if not enabled:
        return None
    padding = max(1, image_size // 8)
    return lambda x, generator: random_crop_flip(x, padding=padding, flip=True, generator=generator)


def _draw(generator: torch.Generator | None, device: torch.device, fn, *args, **kwargs) -> Tensor:
    # Draw on the generator's device (a CPU generator cannot feed a CUDA kernel), then move to x's.
    gen_device = generator.device if generator is not None else device
    return fn(*args, generator=generator, device=gen_device, **kwargs).to(device)


def random_crop_flip(x: Tensor, *, padding: int, flip: bool, generator: torch.Generator | None = None) -> Tensor:
    """Random crop after zero padding (torchvision RandomCrop(padding=p) default) and horizontal flip.

    x: (N, C, H, W), any dtype. Each image gets its own offsets in [0, 2*padding] and a flip with
    p=0.5. padding=0 and flip=False return x unchanged.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    if padding == 0 and not flip:
        return x
    device = x.device
    if padding > 0:
        dy = _draw(generator, device, torch.randint, 0, 2 * padding + 1, (n,))
        dx = _draw(generator, device, torch.randint, 0, 2 * padding + 1, (n,))
    if flip:
        mirrored = _draw(generator, device, torch.rand, (n,)) < 0.5
    if padding == 0:
        return torch.where(mirrored[:, None, None, None], x.flip(3), x)

    # Crop = two gathers on the zero-padded batch: rows first, then columns. A flip is folded into
    # the column index (read the window right to left), so it costs nothing extra.
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=device)                       # (N, H)
    cols = torch.arange(w, device=device)
    if flip:
        cols = torch.where(mirrored[:, None], w - 1 - cols, cols)              # (N, W)
    cols = dx[:, None] + cols
    wp = w + 2 * padding
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, wp))       # (N, C, H, W+2p)
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))         # (N, C, H, W)
