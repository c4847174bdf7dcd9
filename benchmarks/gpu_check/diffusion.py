"""Generated pools on a GPU: a DM-AT-sized 32x32 class-conditional UNet's training and sampling images/s per GPU,
through the code the diffusion and generate stages run (ml.diffusion.train_diffusion, ml.sampling.denoise).

The UNet is google/ddpm-cifar10-32's architecture (diffusers UNet2DModel: widths 128, 256, 256, 256, two ResNet
blocks per resolution, attention at 16x16; 35.7M parameters) with class embeddings; DM-AT's EDM DDPM++ is a
56M-parameter network of the same family. A rehearsal on a CPU runs the same code on a 2-level toy UNet.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpu_check.common import Context, Skipped

DDPM_CIFAR10 = {"block_out_channels": (128, 256, 256, 256), "layers_per_block": 2,
                "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")}


def dm_at_unet(quick: bool):
    from diffusers import UNet2DModel

    from ml.diffusion import build_unet

    torch.manual_seed(0)
    if quick:
        return build_unet(image_size=32, in_channels=3, num_classes=10, block_out_channels=(8, 16))
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, num_class_embeds=10, **DDPM_CIFAR10)


def _skip_emulated_bf16(ctx: Context, precision: str) -> None:
    if precision == "bf16" and ctx.rehearsal:
        from ml.devices import native_bf16

        if not native_bf16(ctx.device):
            raise Skipped("this CPU has no native bf16")


def unet_train_check(precision: str, *, channels_last: bool = False) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        from ml import diffusion

        _skip_emulated_bf16(ctx, precision)
        batch, steps = (8, 2) if ctx.quick else (256, 20)
        unet = dm_at_unet(ctx.quick).to(ctx.device)
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(batch * (steps + 2), 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=len(images))
        recipe = diffusion.DiffusionRecipe(epochs=1, batch_size=batch, lr=2e-4, weight_decay=0.0, ema_decay=0.9999,
                                           flip=True)
        with tempfile.TemporaryDirectory() as out:
            # One epoch of steps + 2 batches; the epoch's own images/s, minus the first two (warm-up) is not
            # separable, so the row's figure includes them: a lower bound on the steady rate.
            _, rows = diffusion.train_diffusion(unet, images, labels, recipe, train_model=unet,
                                                scheduler_config=dict(diffusion.DEFAULT_SCHEDULE), device=ctx.device,
                                                precision=precision, seed=0, out_dir=Path(out),
                                                checkpoint_every_s=1e9, log=lambda _: None, progress_bar=False)
        parameters = sum(p.numel() for p in unet.parameters())
        return (f"{parameters / 1e6:.1f}M-parameter UNet batch {batch}: {rows[-1]['images_per_s']:.0f} img/s "
                f"training ({steps + 2} steps incl. warm-up), loss {rows[-1]['loss']:.3f}")
    return check


def unet_sample_check(precision: str, steps: int = 20) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        from ml import diffusion, sampling

        _skip_emulated_bf16(ctx, precision)
        batch = 4 if ctx.quick else 1024
        unet = dm_at_unet(ctx.quick).to(ctx.device).eval()
        noise = torch.randn((batch, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(ctx.device)
        labels = torch.arange(batch, device=ctx.device) % 10
        scheduler = sampling.build_sampler(diffusion.DEFAULT_SCHEDULE, "dpm-solver++", steps)
        sampling.denoise(unet, scheduler, noise, labels, steps=2, precision=precision)  # warm-up
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        sampling.to_uint8(sampling.denoise(unet, scheduler, noise, labels, steps=steps, precision=precision))
        rate = batch / (time.perf_counter() - started)
        return (f"DPM-Solver++ {steps} steps, batch {batch}: {rate:.0f} img/s "
                f"({rate * 86400 / 1e6:.1f}M images per GPU-day)")
    return check
