"""Sampling a diffusion model into pool images: the fast samplers (built from the training noise schedule),
the per-image initial noise and classes, and the denoising loop. Plain functions on tensors and modules.

Image i of a pool depends only on (seed, i): its initial noise comes from a generator seeded by (seed, i)
and its class is i % K (balanced: every prefix of the pool is balanced) or drawn from (seed, i). The
samplers are deterministic given that noise, so any process can make any image, and a batch's images
come out as they would in any other batch of the same rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ml.devices import autocast
from ml.resume import seed_from

# name -> what the user gets: DPM-Solver++ (2nd-order multistep, one network evaluation a step), DDIM (one a
# step), Heun with Karras sigmas (EDM's deterministic sampler as DM-AT uses it: 2 * steps - 1 evaluations).
SAMPLERS = ("dpm-solver++", "ddim", "heun")
_CLASS_STREAM = 1  # the second key of an image's class draw, so it never shares a seed with its noise


def build_sampler(scheduler_config: dict, sampler: str, steps: int):
    """A diffusers scheduler for `sampler` from the training schedule's config, set to `steps` steps."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if sampler == "dpm-solver++":
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    elif sampler == "ddim":
        scheduler = DDIMScheduler.from_config(config)
    elif sampler == "heun":
        scheduler = HeunDiscreteScheduler.from_config(config, use_karras_sigmas=True)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; one of {', '.join(SAMPLERS)}")
    scheduler.set_timesteps(steps)
    return scheduler


def network_evaluations(sampler: str, steps: int) -> int:
    """UNet forwards per image."""
    return 2 * steps - 1 if sampler == "heun" else steps


def initial_noise(seed: int, start: int, stop: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """N(0, 1) noise (stop - start, C, H, W) on the CPU, row i - start drawn from a generator seeded by
    (seed, i): the same on every device and in every batch."""
    noise = torch.empty((stop - start, *shape))
    generator = torch.Generator()
    for row, i in enumerate(range(start, stop)):
        generator.manual_seed(seed_from(seed, i))
        torch.randn(shape, generator=generator, out=noise[row])
    return noise


def image_classes(seed: int, start: int, stop: int, num_classes: int, balanced: bool) -> np.ndarray:
    """The conditioning class of images start..stop-1: i % K when balanced, else drawn from (seed, i)."""
    if balanced:
        return np.arange(start, stop, dtype=np.int64) % num_classes
    return np.array([seed_from(seed, i, _CLASS_STREAM) % num_classes for i in range(start, stop)], dtype=np.int64)


@torch.inference_mode()
def denoise(unet, scheduler, noise: torch.Tensor, class_labels: torch.Tensor | None, *, steps: int,
            precision: str = "fp32", memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Run `scheduler` (from build_sampler; reset here, so one serves every batch) from `noise` (NCHW on the
    UNet's device) to images on [-1, 1]; the UNet under autocast, the sampler's arithmetic in fp32."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    amp = autocast(noise.device, precision)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t).contiguous(memory_format=memory_format)
        with amp:
            eps = unet(model_input, t, class_labels=class_labels).sample
        x = scheduler.step(eps.float(), t, x).prev_sample
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats to uint8 NHWC pixels (rounded), as a NumPy array on the host."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def check_precision(precision: str, device: torch.device) -> None:
    """fp16 autocast is for CUDA, as in training (ml.devices.prepare_for_training)."""
    from pipeline.core.errors import UserError

    if precision == "fp16" and device.type != "cuda":
        raise UserError("run.precision = \"fp16\" needs a CUDA device; use run.precision = \"bf16\" or \"fp32\" "
                        "to sample on the CPU.")


def prepare_for_sampling(unet, device: torch.device, *, channels_last: bool, compile: bool) -> tuple[Any, Any]:
    """(callable UNet, memory format of its inputs): moved, in eval mode, channels_last and compiled as asked."""
    unet = unet.to(device).eval().requires_grad_(False)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return (torch.compile(unet) if compile else unet), memory_format
