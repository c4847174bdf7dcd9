"""Batch augmentations as tensor ops on the batch's device (airbench style: no per-image Python loop)."""
from __future__ import annotations

from collections.abc import Callable

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


def cutmix(x: Tensor, rows: Tensor, probability: float, generator: torch.Generator | None = None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """CutMix (Yun et al. 2019) among the marked rows of a batch: each row with rows[i] True, with
    `probability`, gets a box pasted from another marked row (a random permutation of them), the box's
    area ratio drawn from U(0, 1) (Beta(1, 1), CutMix's alpha = 1) and its centre uniformly over the
    image, clipped at the border as in the reference code. Unmarked rows are left alone.

    Returns (mixed x, partner (B,) int64: the row each box came from, itself where none was pasted,
    share (B,) float: the box's share of the image's area after clipping, 0 where none was pasted). The
    label of a mixed row is (1 - share) of its own plus share of its partner's.
    """
    n, _, h, w = x.shape
    device = x.device
    candidates = rows.nonzero().flatten()
    order = _draw(generator, device, torch.randperm, len(candidates))
    partner = torch.arange(n, device=device)
    partner[candidates] = candidates[order]
    mixed = rows & (_draw(generator, device, torch.rand, (n,)) < probability)
    # The box: side ratio sqrt(area ratio) (reference: cut_rat = sqrt(1 - lam), lam ~ Beta(1, 1)).
    side = _draw(generator, device, torch.rand, (n,)).sqrt()
    cy = _draw(generator, device, torch.randint, 0, h, (n,))
    cx = _draw(generator, device, torch.randint, 0, w, (n,))
    half_h, half_w = (side * h).long() // 2, (side * w).long() // 2
    top, bottom = (cy - half_h).clamp(0, h), (cy + half_h).clamp(0, h)
    left, right = (cx - half_w).clamp(0, w), (cx + half_w).clamp(0, w)
    in_rows = (torch.arange(h, device=device) >= top[:, None]) & (torch.arange(h, device=device) < bottom[:, None])
    in_cols = (torch.arange(w, device=device) >= left[:, None]) & (torch.arange(w, device=device) < right[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :] & mixed[:, None, None])[:, None]  # (N, 1, H, W)
    out = torch.where(box, x[partner], x)
    share = box.flatten(1).float().mean(dim=1)
    return out, partner, share
