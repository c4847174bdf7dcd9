import pytest
import torch
import torch.nn.functional as F

from data.augment import random_crop_flip


def batch(n=16, c=3, h=8, w=10, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_shape_dtype_and_identity():
    x = batch()
    y = random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    xb = (x * 255).to(torch.uint8)  # any dtype works, the crop is pure indexing
    assert random_crop_flip(xb, padding=2, flip=True).dtype == torch.uint8


def test_flip_only_gives_image_or_mirror():
    x = batch(n=64)
    y = random_crop_flip(x, padding=0, flip=True, generator=torch.Generator().manual_seed(3))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert same.any() and mirrored.any()  # p=0.5 over 64 images


def windows(padded, h, w):
    """Every translated window of one padded image, with and without mirroring."""
    hp, wp = padded.shape[-2:]
    for dy in range(hp - h + 1):
        for dx in range(wp - w + 1):
            win = padded[:, dy:dy + h, dx:dx + w]
            yield (dy, dx, False), win
            yield (dy, dx, True), win.flip(-1)


def test_crop_is_translated_window_of_zero_padded_input():
    x, p = batch(n=12), 3
    y = random_crop_flip(x, padding=p, flip=False, generator=torch.Generator().manual_seed(5))
    y_flip = random_crop_flip(x, padding=p, flip=True, generator=torch.Generator().manual_seed(6))
    padded = F.pad(x, (p, p, p, p))
    offsets = set()
    for i in range(len(x)):
        match = [k for k, win in windows(padded[i], 8, 10) if torch.equal(win, y[i]) and not k[2]]
        assert match, f"image {i} is not a window of its padded input"
        offsets.add(match[0][:2])
        assert any(torch.equal(win, y_flip[i]) for _, win in windows(padded[i], 8, 10))
    assert len(offsets) > 1  # offsets are per image, not one for the batch


def test_reference_slicing_for_known_offsets():
    # Same draws as the implementation: dy, dx, then the flip mask, from the generator.
    x, p = batch(n=5), 2
    g = torch.Generator().manual_seed(11)
    dy = torch.randint(0, 2 * p + 1, (5,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (5,), generator=g)
    mirrored = torch.rand(5, generator=g) < 0.5
    y = random_crop_flip(x, padding=p, flip=True, generator=torch.Generator().manual_seed(11))
    padded = F.pad(x, (p, p, p, p))
    for i in range(5):
        ref = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 10]
        if mirrored[i]:
            ref = ref.flip(-1)
        assert torch.equal(y[i], ref)


def test_deterministic_with_seeded_generator():
    x = batch()
    a = random_crop_flip(x, padding=4, flip=True, generator=torch.Generator().manual_seed(7))
    b = random_crop_flip(x, padding=4, flip=True, generator=torch.Generator().manual_seed(7))
    c = random_crop_flip(x, padding=4, flip=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cutmix_pastes_boxes_only_among_the_marked_rows():
    from data.augment import cutmix

    n = 64
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 8, 8).clone()  # row i is all i
    rows = torch.arange(n) % 2 == 1
    out, partner, share = cutmix(x, rows, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out[~rows], x[~rows]) and (share[~rows] == 0).all()
    assert torch.equal(partner[~rows], torch.arange(n)[~rows])
    assert rows[partner].equal(rows)  # boxes come from marked rows only
    for i in range(n):
        pasted = out[i] == partner[i].float()
        own = out[i] == float(i)
        assert (pasted | own).all()
        if partner[i] != i:
            # The box is a rectangle whose area is the reported share.
            assert pasted.float().mean().item() == pytest.approx(share[i].item())
            r, c = pasted[0].nonzero().T
            if len(r):
                assert pasted[0, r.min():r.max() + 1, c.min():c.max() + 1].all()
    # Box areas spread over (0, 1): CutMix's Beta(1, 1).
    assert 0.2 < share[rows].mean().item() < 0.7


def test_cutmix_probability_and_determinism():
    from data.augment import cutmix

    x = torch.rand(400, 1, 8, 8)
    rows = torch.ones(400, dtype=torch.bool)
    _, _, none = cutmix(x, rows, 0.0, torch.Generator().manual_seed(1))
    assert (none == 0).all()
    a = cutmix(x, rows, 0.5, torch.Generator().manual_seed(1))
    b = cutmix(x, rows, 0.5, torch.Generator().manual_seed(1))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    mixed = (a[2] > 0).float().mean().item()
    assert 0.35 < mixed < 0.55  # half the rows drawn, a few of those with an empty or self box
