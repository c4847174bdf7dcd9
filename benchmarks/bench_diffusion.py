"""Diffusion training throughput: the diffusion stage's training loop against a bare diffusers loop.

Measured: `ml.diffusion.train_diffusion` as the stage calls it (uint8 images on the device, per-batch seeded
draws of the batch order, flips, noise and timesteps, AdamW, the per-step cosine schedule, the weight EMA,
running sums), for one epoch of `steps` batches; its images/s is the epoch's own figure (the loop, not the
set-up). Reference: the loop of diffusers' own training example written straight-line over one batch
already in memory as float NCHW on [-1, 1]: `DDPMScheduler.add_noise`, the UNet's forward with class labels,
MSE against the noise, AdamW step, LambdaLR step, diffusers' `EMAModel.step`, in fp32. Same UNet (the demo
generator's: block_out_channels (16, 32, 32), one layer per block, no attention, 28x28x1, 10 classes) and
initial weights on both sides. Target: the stage >= 1.0x the bare loop (fp32; channels_last counted when it
is the faster setting).

Rounds alternate (bare, stage fp32, stage fp32 + channels_last, bare, ...); each side keeps its median round.
Runtime: about 3 minutes on 2 idle cores (--quick about 1).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import Comparison, print_header
from ml import diffusion

BATCH = 128
WIDTHS = (16, 32, 32)


def images_and_labels(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, size=n)


def fresh_unet():
    torch.manual_seed(0)
    return diffusion.build_unet(image_size=28, in_channels=1, num_classes=10, block_out_channels=WIDTHS)


def bare_loop(images: np.ndarray, labels: np.ndarray, steps: int) -> float:
    """diffusers' training example, straight-line; returns images/s over `steps` timed steps."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    unet = fresh_unet().train()
    schedule = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = EMAModel(unet.parameters(), decay=0.999)
    clean = torch.from_numpy(images[:BATCH]).permute(0, 3, 1, 2).float() / 127.5 - 1
    classes = torch.from_numpy(labels[:BATCH])
    started = time.perf_counter()
    for _ in range(steps):
        noise = torch.randn_like(clean)
        t = torch.randint(0, 1000, (BATCH,))
        noisy = schedule.add_noise(clean, noise, t)
        loss = F.mse_loss(unet(noisy, t, class_labels=classes).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr.step()
        ema.step(unet.parameters())
    return steps * BATCH / (time.perf_counter() - started)


def stage_loop(images: np.ndarray, labels: np.ndarray, steps: int, *, channels_last: bool) -> float:
    unet = fresh_unet()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    recipe = diffusion.DiffusionRecipe(epochs=1, batch_size=BATCH, lr=2e-3, weight_decay=0.0, ema_decay=0.999,
                                       flip=True)
    with tempfile.TemporaryDirectory() as out:
        _, rows = diffusion.train_diffusion(unet, images[:steps * BATCH], labels[:steps * BATCH], recipe,
                                            train_model=unet, scheduler_config=dict(diffusion.DEFAULT_SCHEDULE),
                                            device=torch.device("cpu"), precision="fp32", seed=0,
                                            out_dir=Path(out), checkpoint_every_s=1e9, log=lambda _: None,
                                            progress_bar=False)
    return rows[-1]["images_per_s"]


def run(quick: bool = False, steps: int | None = None, rounds: int | None = None) -> list[Comparison]:
    steps, rounds = steps or (6 if quick else 12), rounds or (2 if quick else 3)
    images, labels = images_and_labels(steps * BATCH)
    for warm in (lambda: bare_loop(images, labels, 1), lambda: stage_loop(images, labels, 1, channels_last=True)):
        warm()  # oneDNN primitives are created on the first step
    rates: dict[str, list[float]] = {"bare": [], "fp32": [], "fp32+channels_last": []}
    for _ in range(rounds):
        rates["bare"].append(bare_loop(images, labels, steps))
        rates["fp32"].append(stage_loop(images, labels, steps, channels_last=False))
        rates["fp32+channels_last"].append(stage_loop(images, labels, steps, channels_last=True))
    bare = statistics.median(rates["bare"])
    rows = [Comparison("diffusion", f"stage {name} vs bare diffusers loop", "stage", statistics.median(r),
                       "bare", bare, "img/s", ">=", 1.0, note=f"batch {BATCH}, {steps} steps x {rounds} rounds")
            for name, r in rates.items() if name != "bare"]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print_header("diffusion")
    for row in run(quick=args.quick):
        print(row.line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
