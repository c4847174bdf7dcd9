"""Stage diffusion: the pipeline's generator, for pools sampled from a diffusion model instead of TinyImages.

Its main path imports a model the user has (`diffusion.checkpoint`: a directory diffusers' save_pretrained
wrote, a UNet2DModel or a pipeline with unet/ and scheduler/; safetensors only). Its other path trains a
class-conditional UNet2DModel (diffusers) with DDPM's noise objective on the labeled training images only:
its fingerprint depends on the labeled set, the split and its own section, never on [pool] or on a training
stage, so one generator serves every pool, teacher and student built on it.

Outputs: model/ (the generator layout of ml.diffusion), metrics.csv (one row per epoch; empty for an
import), samples.png (a row of samples per class, from the EMA weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from data.sources import LABELED
from pipeline.core.checks import at_least, below_1, positive
from pipeline.stage import RUNTIME, Source, Stage
from stages.training_section import MAX_BATCH, MAX_EPOCHS

MODEL_FILES = ("model/unet/config.json", "model/unet/diffusion_pytorch_model.safetensors",
               "model/scheduler/scheduler_config.json", "model/rst_mart.json")


@dataclass
class DiffusionConfig:
    checkpoint: str = ""  # a diffusers directory to import instead of training (save_pretrained layout); "" = train
    epochs: int = 120  # passes over the labeled images
    batch_size: int = 128  # images per optimizer step (global under torchrun)
    lr: float = 2e-3  # AdamW learning rate at the start of a per-step cosine schedule to zero
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    ema_decay: float = 0.999  # EMA of the weights (warmed up); the EMA is what gets saved and sampled
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32])  # UNet widths, one per resolution
    layers_per_block: int = 1  # ResNet blocks per resolution
    attention: bool = False  # self-attention blocks at every resolution (diffusers' AttnDownBlock2D)
    num_train_timesteps: int = 1000  # DDPM noise levels (linear betas 1e-4..0.02)
    flip: bool = True  # random horizontal flips of the training images
    sample_steps: int = 20  # DDIM steps for samples.png

    RANGES: ClassVar[dict] = {
        "epochs": at_least(1, high=MAX_EPOCHS),
        "batch_size": at_least(1, high=MAX_BATCH),
        "lr": positive(),
        "weight_decay": at_least(0),
        "ema_decay": below_1("0.999 for a few thousand steps, 0.9999 for long runs"),
        "layers_per_block": at_least(1, high=8),
        "num_train_timesteps": at_least(2, high=100_000),
        "sample_steps": at_least(1, high=1000),
    }

    def check(self, config, refuse, world_size: int) -> None:
        if self.checkpoint:
            return
        widths = self.block_out_channels
        if not widths or len(widths) > 6 or any(not isinstance(w, int) or not 1 <= w <= 4096 for w in widths):
            raise refuse("diffusion.block_out_channels", f"it is {widths}; it must list 1 to 6 widths in 1..4096",
                         "Use e.g. --set diffusion.block_out_channels=[16,32,32].")


def run(ctx) -> None:
    import torch

    from ml import diffusion
    from ml.devices import prepare_for_training, resolve_device, resolve_precision

    cfg, run_cfg = ctx.config.diffusion, ctx.config.run
    split = ctx.sources["labeled"]
    labeled = split.dataset
    model_dir = ctx.out_dir / "model"
    if not cfg.checkpoint and cfg.batch_size % ctx.dist.world_size:
        # Checked here, not in the section's check: a torchrun user who never runs this stage must not be
        # told to change its batch.
        from pipeline.core.errors import UserError

        raise UserError(f"`diffusion.batch_size` is {cfg.batch_size}; the global batch is split evenly across the "
                        f"{ctx.dist.world_size} torchrun processes, and it is not a multiple of that. Use a multiple "
                        f"of {ctx.dist.world_size} or change --nproc_per_node.")
    if cfg.checkpoint:
        unet, schedule, info = ctx.sources["diffusion_checkpoint"]  # loaded and checked before any stage ran
        rows = []
        device = resolve_device(run_cfg.device, ctx.dist.local_rank)
        ema = unet.to(device)
    else:
        images = labeled.train_images[split.labeled_index]
        labels = labeled.train_labels[split.labeled_index]
        height, _, channels = labeled.image_shape
        info = diffusion.GeneratorInfo(num_classes=labeled.num_classes, class_names=tuple(labeled.class_names),
                                       image_size=height, in_channels=channels, dataset=labeled.name)
        schedule = {**diffusion.DEFAULT_SCHEDULE, "num_train_timesteps": cfg.num_train_timesteps}
        device = resolve_device(run_cfg.device, ctx.dist.local_rank)
        torch.manual_seed(run_cfg.seed)
        unet = diffusion.build_unet(image_size=height, in_channels=channels, num_classes=labeled.num_classes,
                                    block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                                    attention=cfg.attention)
        train_model, scaler = prepare_for_training(unet, run_cfg=run_cfg, device=device,
                                                   distributed=ctx.dist.enabled)
        unet = unet.to(device)
        precision = resolve_precision(run_cfg.precision, device)
        ctx.log(f"  training a {sum(p.numel() for p in unet.parameters()):,}-parameter UNet2DModel on "
                f"{len(images):,} labeled images, precision {precision} on {device}")
        recipe = diffusion.DiffusionRecipe(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                           weight_decay=cfg.weight_decay, ema_decay=cfg.ema_decay, flip=cfg.flip)
        ema, rows = diffusion.train_diffusion(
            unet, images, labels, recipe, train_model=train_model, scheduler_config=schedule, device=device,
            precision=precision, seed=run_cfg.seed, rank=ctx.dist.rank, world_size=ctx.dist.world_size,
            scaler=scaler, out_dir=ctx.out_dir, checkpoint_every_s=run_cfg.checkpoint_every_s, log=ctx.log,
            progress_bar=ctx.dist.is_main)
    if not ctx.dist.is_main:
        return
    from ml.training import write_metrics

    ema = ema.to(memory_format=torch.contiguous_format).eval()
    diffusion.save_generator(model_dir, ema, schedule, info)
    write_metrics(ctx.out_dir / "metrics.csv", rows)
    grid = diffusion.sample_grid(ema, schedule, info, per_class=8, steps=cfg.sample_steps, seed=run_cfg.seed,
                                 device=device)
    _save_png(ctx.out_dir / "samples.png", grid)
    (ctx.out_dir / diffusion.STATE_FILE).unlink(missing_ok=True)


def _save_png(path: Path, grid) -> None:
    from PIL import Image

    from pipeline.core.atomic import atomic_path

    image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    scale = max(1, 256 // max(grid.shape[:2]))  # small images are hard to judge at 1:1
    image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _checkpoint_fingerprint(config) -> str:
    from ml.diffusion import generator_files
    from pipeline.core.fingerprint import file_digest, fingerprint

    return fingerprint({"files": [file_digest(f) for f in generator_files(config.diffusion.checkpoint)]})


def open_checkpoint(config, cache_dir: Path) -> tuple:
    """The imported generator, checked against the labeled set (channels, size, classes), as (unet, schedule,
    info); the engine opens sources before the first stage runs, so a bad directory creates nothing."""
    from data.sources import open_labeled
    from ml import diffusion

    labeled = open_labeled(config).dataset
    unet, schedule, info = diffusion.load_generator(config.diffusion.checkpoint)
    diffusion.check_generator_fits(info, image_shape=labeled.image_shape, num_classes=labeled.num_classes,
                                   where=config.diffusion.checkpoint)
    info = diffusion.GeneratorInfo(num_classes=info.num_classes, image_size=info.image_size,
                                   in_channels=info.in_channels, dataset=labeled.name,
                                   class_names=tuple(labeled.class_names) if info.num_classes else ())
    return unet, schedule, info


CHECKPOINT = Source("diffusion_checkpoint", _checkpoint_fingerprint, open_checkpoint)


def inputs(config) -> tuple:
    return (LABELED, CHECKPOINT) if config.diffusion.checkpoint else (LABELED,)


def results(entry: Path) -> list[dict]:
    """The last epoch's noise-prediction loss: sweep.csv's `diffusion.loss`."""
    import pandas as pd

    frame = pd.read_csv(entry / "metrics.csv")
    return [] if frame.empty else [{"metric": "loss", "value": float(frame["loss"].iloc[-1])}]


def report(entry: Path) -> str:
    from stages.reporting import curves, png

    return curves(entry, "diffusion") + "\n" + png(entry, "samples.png", heading="samples, a row per class")


STAGE = Stage(
    name="diffusion", version=1, section="diffusion", config=DiffusionConfig, run=run, inputs=inputs,
    results=results, report=report, distributed_changes_results=True,
    outputs=(*MODEL_FILES, "metrics.csv", "samples.png"),
    reads=("data.num_labeled", "run.seed", "run.precision", *RUNTIME),
    # An imported directory is known by its files' digests (an input), so moving it does not re-import it.
    insignificant=("checkpoint", *RUNTIME))
