"""Diffusion models on diffusers: build a class-conditional UNet, train it with the DDPM noise objective,
save and load it in diffusers' `save_pretrained` layout (safetensors only, nothing unpickled), sample it.

A generator directory is a diffusers pipeline layout plus one file of ours:
    unet/config.json, unet/diffusion_pytorch_model.safetensors   a UNet2DModel (class-conditional when its
                                                                  config has num_class_embeds)
    scheduler/scheduler_config.json                               the training noise schedule
    rst_mart.json                                                  {"num_classes", "class_names", "image_size",
                                                                    "in_channels", "dataset"}
Images go in and out of the UNet NCHW on [-1, 1]; the pool files hold them as uint8 NHWC.

Training resumes after a kill with the uninterrupted run's weights on CPU: every random draw (batch order,
flips, noise, timesteps) comes from a generator seeded by (seed, epoch, batch, rank), and the checkpoint
holds the weights, optimizer, schedule, EMA and position.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ml.devices import autocast, unwrap
from ml.optim import WeightEMA, make_scheduler
from ml.resume import seed_from
from pipeline.core.atomic import atomic_torch_save, atomic_write_json, new_file_mode
from pipeline.core.bounded import read_regular
from pipeline.core.errors import UserError

UNET_DIR, SCHEDULER_DIR, INFO_FILE = "unet", "scheduler", "rst_mart.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
STATE_FILE = "diffusion_state.pt"  # resume state in the stage's partial directory
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                    "prediction_type": "epsilon"}  # DDPM's (Ho et al. 2020)


@dataclass(frozen=True)
class GeneratorInfo:
    """What the pipeline needs to know of a generator besides its weights."""

    num_classes: int  # 0 = unconditional
    class_names: tuple[str, ...]
    image_size: int
    in_channels: int
    dataset: str = ""

    def as_json(self) -> dict:
        return {"num_classes": self.num_classes, "class_names": list(self.class_names),
                "image_size": self.image_size, "in_channels": self.in_channels, "dataset": self.dataset}


def build_unet(*, image_size: int, in_channels: int, num_classes: int, block_out_channels: Sequence[int] = (16, 32, 32),
               layers_per_block: int = 1, attention: bool = False):
    """A diffusers UNet2DModel; class embeddings when num_classes > 0. Without attention the mid block is two
    ResNet blocks; GroupNorm groups are the largest of 32, 16, 8, 4, 2, 1 dividing every width."""
    from diffusers import UNet2DModel

    widths = tuple(int(w) for w in block_out_channels)
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
    down = ("AttnDownBlock2D" if attention else "DownBlock2D",) * len(widths)
    up = ("AttnUpBlock2D" if attention else "UpBlock2D",) * len(widths)
    return UNet2DModel(sample_size=image_size, in_channels=in_channels, out_channels=in_channels,
                       block_out_channels=widths, layers_per_block=layers_per_block, down_block_types=down,
                       up_block_types=up, num_class_embeds=num_classes or None, norm_num_groups=groups,
                       add_attention=attention)


def noise_schedule(scheduler_config: dict | None = None):
    """The training schedule (a DDPMScheduler) from a saved scheduler config, DDPM's by default."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({**DEFAULT_SCHEDULE, **(scheduler_config or {})})


# -- files -------------------------------------------------------------------------------------------------

def save_generator(directory: Path, unet, scheduler_config: dict, info: GeneratorInfo) -> None:
    """Write `directory` in the generator layout (the caller's directory is a partial one, renamed when done)."""
    directory = Path(directory)
    unwrap(unet).save_pretrained(directory / UNET_DIR, safe_serialization=True)
    noise_schedule(scheduler_config).save_pretrained(directory / SCHEDULER_DIR)
    atomic_write_json(directory / INFO_FILE, info.as_json())
    for path in directory.rglob("*"):  # safetensors writes 0600; teammates read the store as they read any file
        if path.is_file():
            path.chmod(new_file_mode())


def generator_files(directory: str | Path) -> list[Path]:
    """The files that make a generator directory what it is (for its fingerprint)."""
    unet_dir, _ = _layout(Path(directory))
    files = [unet_dir / "config.json", unet_dir / WEIGHTS_FILE]
    extra = [Path(directory) / SCHEDULER_DIR / "scheduler_config.json", Path(directory) / "scheduler_config.json",
             Path(directory) / INFO_FILE]
    return files + [f for f in extra if f.is_file()]


def load_generator(directory: str | Path, *, key: str = "diffusion.checkpoint") -> tuple[Any, dict, GeneratorInfo]:
    """(unet in eval mode, the training schedule's config, info) from a generator or a diffusers directory:
    a pipeline (`unet/` and `scheduler/`) or a bare UNet2DModel (config.json and its safetensors).
    Only safetensors weights are read; a directory of pickles is refused."""
    from diffusers import UNet2DModel

    directory = Path(directory)
    unet_dir, config = _layout(directory, key=key)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"The diffusion model in {unet_dir} (`{key}`) could not be loaded: "
                        f"{str(error).splitlines()[0]}. Save it again with diffusers' save_pretrained "
                        f"(safe_serialization=True), or point `{key}` at another directory.") from None
    # A pipeline keeps it in scheduler/; google/ddpm-cifar10-32 keeps it beside the model's config.json.
    scheduler_file = next((f for f in (directory / SCHEDULER_DIR / "scheduler_config.json",
                                       directory / "scheduler_config.json") if f.is_file()), None)
    scheduler_config = _read_json(scheduler_file, key) if scheduler_file else dict(DEFAULT_SCHEDULE)
    if scheduler_config.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(f"{scheduler_file} (`{key}`): the model predicts `{scheduler_config['prediction_type']}`; "
                        f"rst-mart samples noise-predicting (epsilon) models. Use such a model.")
    size = unet.config.sample_size
    size = size if isinstance(size, int) else int(size[0])
    stored = _read_json(directory / INFO_FILE, key) if (directory / INFO_FILE).is_file() else {}
    num_classes = int(unet.config.num_class_embeds or 0)
    info = GeneratorInfo(num_classes=num_classes, image_size=size, in_channels=int(unet.config.in_channels),
                         class_names=tuple(stored.get("class_names", ())), dataset=str(stored.get("dataset", "")))
    return unet.eval(), {k: v for k, v in scheduler_config.items() if not k.startswith("_")}, info


def check_generator_fits(info: GeneratorInfo, *, image_shape: tuple[int, int, int], num_classes: int, where: str,
                         key: str = "diffusion.checkpoint") -> None:
    """The generator must make images of the labeled set's shape (H, W, C), and a conditional one its classes."""
    height, width, channels = image_shape
    if info.in_channels != channels:
        raise UserError(f"The diffusion model {where} (`{key}`) makes {info.in_channels}-channel images; the labeled "
                        f"images have {channels}. Use a model trained on {channels}-channel images.")
    if (info.image_size, info.image_size) != (height, width):
        raise UserError(f"The diffusion model {where} (`{key}`) makes {info.image_size}x{info.image_size} images; the "
                        f"labeled images are {height}x{width}, and the pool must match them. Use a model trained at "
                        f"{height}x{width}, or leave `{key}` empty to train one on the labeled images.")
    if info.num_classes and info.num_classes != num_classes:
        raise UserError(f"The diffusion model {where} (`{key}`) is conditioned on {info.num_classes} classes; the "
                        f"labeled set has {num_classes}. Use a model of the same classes, or an unconditional one "
                        f"(the teacher's pseudo-labels then label its images).")


def _layout(directory: Path, key: str = "diffusion.checkpoint") -> tuple[Path, dict]:
    """(the UNet's folder, its config) of a pipeline or bare-model directory, checked for a UNet2DModel with
    safetensors weights."""
    if not directory.is_dir():
        raise UserError(f"The diffusion model directory {directory} (`{key}`) does not exist. Point `{key}` at a "
                        f"directory diffusers' save_pretrained wrote (e.g. google/ddpm-cifar10-32 fetched with "
                        f"huggingface_hub's snapshot_download), or leave it empty to train one.")
    unet_dir = next((d for d in (directory / UNET_DIR, directory) if (d / "config.json").is_file()), None)
    if unet_dir is None:
        raise UserError(f"{directory} (`{key}`) has neither config.json nor unet/config.json, so it is not a "
                        f"diffusers model directory. Point `{key}` at the directory save_pretrained wrote (a "
                        f"UNet2DModel, or a pipeline with unet/ and scheduler/).")
    config = _read_json(unet_dir / "config.json", key)
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise UserError(f"{unet_dir / 'config.json'} (`{key}`) describes a {config['_class_name']}; rst-mart samples "
                        f"a diffusers UNet2DModel (pixel space, e.g. google/ddpm-cifar10-32). Point `{key}` at "
                        f"such a model's directory.")
    if not (unet_dir / WEIGHTS_FILE).is_file():
        pickled = sorted(p.name for p in unet_dir.iterdir() if p.suffix in PICKLED_SUFFIXES)
        problem = (f"holds only pickled weights ({', '.join(pickled)}), which rst-mart does not unpickle"
                   if pickled else f"has no {WEIGHTS_FILE}")
        raise UserError(f"The diffusion model directory {unet_dir} (`{key}`) {problem}. Save it with safetensors "
                        f"where you trust it: `UNet2DModel.from_pretrained(DIR).save_pretrained(NEW_DIR, "
                        f"safe_serialization=True)`, and point `{key}` at NEW_DIR.")
    return unet_dir, config


def _read_json(path: Path, key: str) -> dict:
    try:
        value = json.loads(read_regular(path, 1 << 20))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} (`{key}`) is not a readable JSON file ({str(error).splitlines()[0]}). Restore it "
                        f"from the model's source, or point `{key}` at another directory.") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} (`{key}`) holds JSON that is not an object. Restore it from the model's source.")
    return value


# -- training ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DiffusionRecipe:
    epochs: int
    batch_size: int  # global; under torchrun each rank takes its slice
    lr: float  # AdamW, cosine to zero per step
    weight_decay: float
    ema_decay: float
    flip: bool  # random horizontal flips


def train_diffusion(unet, images: np.ndarray, labels: np.ndarray | None, recipe: DiffusionRecipe, *, train_model,
                    scheduler_config: dict, device: torch.device, precision: str, seed: int, rank: int = 0,
                    world_size: int = 1, scaler=None, out_dir: Path, checkpoint_every_s: float = 60.0,
                    log: Callable[[str], None] = print, progress_bar: bool = True) -> tuple[Any, list[dict]]:
    """Train `unet` (through `train_model`, its DDP/compiled wrapper or itself) to predict the noise added to
    `images` (uint8 NHWC) at uniform timesteps; resumes from out_dir/STATE_FILE. Returns (EMA model, rows)."""
    schedule = noise_schedule(scheduler_config)
    alphas = schedule.alphas_cumprod.to(device)
    timesteps = schedule.config.num_train_timesteps
    data = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)  # uint8 NCHW view
    classes = torch.from_numpy(labels.astype(np.int64)).to(device) if labels is not None else None
    steps_per_epoch = max(1, len(data) // recipe.batch_size)
    local = recipe.batch_size // world_size
    # One fused kernel for every parameter where torch has it (CPU and CUDA): 3% more images/s than the
    # per-parameter loop for the demo generator on a 2-core CPU (benchmarks/bench_diffusion.py).
    optimizer = torch.optim.AdamW(unwrap(unet).parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay,
                                  fused=True if device.type in ("cpu", "cuda") else None)
    lr_schedule = make_scheduler(optimizer, schedule="cosine", epochs=recipe.epochs, steps_per_epoch=steps_per_epoch)
    ema = WeightEMA(unwrap(unet), recipe.ema_decay)
    state_path = Path(out_dir) / STATE_FILE

    # -- resume: everything else is drawn from (seed, epoch, batch, rank)
    rows, start_epoch, batch, totals = [], 0, 0, (0.0, 0, 0.0)
    if state_path.exists():
        from ml.checkpoints import read_checkpoint

        state = read_checkpoint(state_path, what="Diffusion training state", map_location=device,
                                fix="Delete it to restart the stage from its first epoch.")
        unwrap(unet).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        rows, start_epoch, batch, totals = state["rows"], state["epoch"], state["batch"], tuple(state["totals"])
        log(f"  resumed from checkpoint at epoch {start_epoch + 1}, batch {batch}")

    def checkpoint(next_epoch: int, next_batch: int, sums: tuple) -> None:
        if rank == 0:
            atomic_torch_save({"model": unwrap(unet).state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": lr_schedule.state_dict(), "ema": ema.state_dict(), "rows": rows,
                               "epoch": next_epoch, "batch": next_batch, "totals": list(sums)}, state_path)

    amp = autocast(device, precision)
    memory_format = _memory_format(unet)  # the inputs follow the weights' layout (run.channels_last)
    generator = torch.Generator(device=device)
    for epoch in range(start_epoch, recipe.epochs):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed_from(seed, epoch)))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device) + totals[0]
        seen, seconds_before = totals[1], totals[2]
        started = last_save = time.perf_counter()
        unet.train()
        bar = tqdm(total=steps_per_epoch, initial=batch, desc=f"diffusion epoch {epoch + 1}", leave=False,
                   disable=not progress_bar, mininterval=1.0)
        for b in range(batch, steps_per_epoch):
            # This rank's slice of the global batch, and its draws, seeded by (seed, epoch, batch, rank).
            rows_index = order[b * recipe.batch_size + rank * local:b * recipe.batch_size + (rank + 1) * local]
            rows_index = rows_index.to(device)
            generator.manual_seed(seed_from(seed, epoch, b, rank))
            x0 = data[rows_index].float().div_(127.5).sub_(1.0)
            if recipe.flip:
                flip = torch.rand(len(x0), generator=generator, device=device) < 0.5
                x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0)
            noise = torch.randn(x0.shape, generator=generator, device=device)
            t = torch.randint(0, timesteps, (len(x0),), generator=generator, device=device)
            a = alphas[t].sqrt()[:, None, None, None]
            s = (1 - alphas[t]).sqrt()[:, None, None, None]
            noisy = a * x0 + s * noise
            with amp:
                predicted = train_model(noisy.contiguous(memory_format=memory_format), t,
                                        class_labels=classes[rows_index] if classes is not None else None).sample
                loss = F.mse_loss(predicted.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            lr_schedule.step()
            ema.update(unwrap(unet))
            with torch.no_grad():
                loss_sum += loss.detach().double() * len(x0)
            seen += len(x0)
            bar.update()
            if time.perf_counter() - last_save >= checkpoint_every_s:
                checkpoint(epoch, b + 1, (float(loss_sum), seen, seconds_before + time.perf_counter() - started))
                last_save = time.perf_counter()
        bar.close()
        seconds = seconds_before + time.perf_counter() - started
        loss_value = float(loss_sum) / max(1, seen)
        if not math.isfinite(loss_value):
            raise UserError(f"diffusion training diverged: the loss became {loss_value} in epoch {epoch + 1}. Lower "
                            f"`diffusion.lr` (or use run.precision = \"fp32\") and run again.")
        rows.append({"epoch": epoch + 1, "step": lr_schedule.last_epoch, "loss": loss_value,
                     "lr": optimizer.param_groups[0]["lr"], "train_acc": float("nan"),
                     "images_per_s": seen * world_size / max(seconds, 1e-9), "seconds": seconds})
        log(f"  epoch {epoch + 1}/{recipe.epochs}: loss {loss_value:.4f}, {rows[-1]['images_per_s']:.0f} img/s")
        batch, totals = 0, (0.0, 0, 0.0)
        checkpoint(epoch + 1, 0, totals)
    return ema.model, rows


def _memory_format(unet) -> torch.memory_format:
    weight = next(unwrap(unet).parameters())
    channels_last = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


# -- the sample grid ---------------------------------------------------------------------------------------

def sample_grid(unet, scheduler_config: dict, info: GeneratorInfo, *, per_class: int, steps: int, seed: int,
                device: torch.device) -> np.ndarray:
    """A grid image (uint8 HWC) of DDIM samples: one row per class (2 rows for an unconditional model),
    from the initial noise of the pool's first images (ml.sampling.initial_noise)."""
    from ml import sampling

    rows = info.num_classes or 2
    shape = (info.in_channels, info.image_size, info.image_size)
    noise = sampling.initial_noise(seed, 0, rows * per_class, shape).to(device)
    labels = (torch.arange(rows * per_class, device=device) // per_class) if info.num_classes else None
    # DDIM clips each step's x0 estimate to [-1, 1] (the DDPM schedule's clip_sample); DPM-Solver++ does not, and
    # a small model's noise estimates at the highest noise levels, divided by sqrt(alpha_bar) ~ 0.006 there,
    # saturate its images: on the demo generator 72% of pixels at 20 steps against 0.4% with DDIM.
    scheduler = sampling.build_sampler(scheduler_config, "ddim", steps)
    images = sampling.to_uint8(sampling.denoise(unet, scheduler, noise, labels, steps=steps))
    size, channels = info.image_size, info.in_channels
    grid = images.reshape(rows, per_class, size, size, channels).transpose(0, 2, 1, 3, 4)
    return grid.reshape(rows * size, per_class * size, channels)
