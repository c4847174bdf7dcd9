"""The training entry of the teacher and mart stages: `train(recipe, data, ...)`.

A stage states how it trains as data (a Recipe: loss, attack or None, the pool's share of each batch,
EMA, best-epoch selection on a validation split) and what it trains on (TrainData); train() builds the
model, sampler, loader, optimizer and schedule, resumes from the last checkpoint, runs the epochs and
writes model.pt (and last.pt when validation picks model.pt) and metrics.csv. Scoring the saved
checkpoints is ml.evaluation's job.

Training state is saved at every epoch end and every `run.checkpoint_every_s` seconds, so a killed run
resumes where it stopped and, on CPU, ends with the same weights as an uninterrupted one: every random
draw comes from generators seeded by (seed, epoch, batch, rank) or from RNG states in the checkpoint.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data.augment import augmenter, cutmix
from data.mixed import MixedBatchLoader, MixedBatchSampler, prefetch_depth
from ml.checkpoints import save_model
from ml.devices import attack_forward, autocast, prepare_for_training, resolve_device, resolve_precision, unwrap
from ml.evaluation import evaluate
from ml.live_log import open_scalar_log
from ml.losses import TargetRecipe
from ml.models import build_model
from ml.optim import WeightEMA, make_optimizer, make_scheduler
from ml.resume import STATE_FILE, load_training_state, save_training_state, seed_from
from pipeline.core import distributed
from pipeline.core.atomic import atomic_write_csv

METRIC_COLUMNS = ["epoch", "step", "loss", "lr", "train_acc", "train_adv_acc", "images_per_s", "seconds"]
PROGRESS_INTERVAL_S = 1.0  # the progress bar redraws at most this often


def natural_loss(logits_natural, logits_adv, targets):
    """Natural training: cross-entropy on the clean logits (there are no adversarial ones)."""
    return F.cross_entropy(logits_natural, targets)


@dataclass(frozen=True)
class Recipe:
    """How a stage trains: everything that differs between the teacher and mart, as data."""

    arch: str
    epochs: int
    batch_size: int  # the global batch; under torchrun each rank trains on its slice
    epoch_size: int  # examples per epoch (at least one batch)
    lr: float
    momentum: float
    weight_decay: float
    schedule: str  # cosine | piecewise | constant, stepped per batch
    milestones: Sequence[int] = ()
    loss: Callable = natural_loss  # (logits_natural, logits_adv or None, y) -> scalar, in train mode
    attack: Callable | None = None  # (model, x, y, generator) -> x_adv, in eval mode; None = natural training
    augment: bool = False  # random crop and flip (data.augment.augmenter)
    unsup_fraction: float = 0.0  # share of each batch drawn from the pool
    ema_decay: float = 0.0  # 0 = no weight EMA; otherwise the EMA is what gets saved and validated
    select_attack: Callable | None = None  # with validation data: model.pt = the epoch most accurate under it
    eval_batch_size: int = 256
    checkpoint_info: Mapping[str, Any] = field(default_factory=dict)  # extra entries of model.pt / last.pt
    targets: TargetRecipe = TargetRecipe()  # label smoothing and pool loss weight (plain: the papers' losses)
    pool_cutmix: float = 0.0  # probability that a pool example gets a CutMix box from another pool example


@dataclass(frozen=True)
class TrainData:
    """What a stage trains on: labeled images, optionally a pseudo-labeled pool and a validation split."""

    images: np.ndarray  # uint8 NHWC
    labels: np.ndarray
    num_classes: int
    class_names: Sequence[str]
    dataset: str
    pool_images: Any = None  # uint8 NHWC array or a PseudoLabelReader
    pool_labels: np.ndarray | None = None
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    @property
    def validating(self) -> bool:
        return self.val_images is not None and len(self.val_images) > 0


@dataclass
class Training:
    """The objects one training run holds: what train_one_epoch steps and checkpoints save."""

    model: nn.Module  # what the loss's forwards go through: the DDP or compiled wrapper, or the module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: MixedBatchLoader
    recipe: Recipe  # its loss, attack, target options and CutMix are what each step applies
    device: torch.device
    precision: str  # resolved: fp32 | bf16 | fp16
    seed: int
    ema: WeightEMA | None = None
    scaler: Any = None  # fp16 only
    rank: int = 0
    world_size: int = 1
    live: Any = None  # ml.live_log.ScalarLog for live curves (rank 0); None = off
    attack_model: Callable | None = None  # what the attack calls (run.compile: compiled); None = unwrap(model)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images on [0, 1] (the model's internal normalisation)."""
    sample = images[:: max(1, len(images) // 10000)].astype(np.float64) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)) + 1e-6
    return [float(m) for m in mean], [float(s) for s in std]


def set_up(recipe: Recipe, data: TrainData, *, run_cfg, dist, mean, std) -> tuple[Training, nn.Module]:
    """The model (seeded by run.seed), sampler, loader, optimizer, schedule and EMA of a training run.
    Returns (training, model): `model` is the plain module the checkpoints save."""
    device = resolve_device(run_cfg.device, dist.local_rank)
    torch.manual_seed(run_cfg.seed)
    model = build_model(recipe.arch, num_classes=data.num_classes, in_channels=data.images.shape[-1], mean=mean,
                        std=std)
    train_model, scaler = prepare_for_training(model, run_cfg=run_cfg, device=device, distributed=dist.enabled)
    ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    num_pool = 0 if data.pool_labels is None else len(data.pool_labels)
    sampler = MixedBatchSampler(len(data.images), num_pool, batch_size=recipe.batch_size,
                                unsup_fraction=recipe.unsup_fraction,
                                epoch_size=max(recipe.epoch_size, recipe.batch_size), seed=run_cfg.seed,
                                rank=dist.rank, world_size=dist.world_size)
    loader = MixedBatchLoader(sampler, data.images, data.labels, data.pool_images, data.pool_labels, device=device,
                              augment=augmenter(recipe.augment, data.images.shape[1]), seed=run_cfg.seed,
                              prefetch=prefetch_depth(run_cfg.num_workers, device), channels_last=run_cfg.channels_last,
                              with_source=True)
    optimizer = make_optimizer(model, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    scheduler = make_scheduler(optimizer, schedule=recipe.schedule, epochs=recipe.epochs,
                               steps_per_epoch=len(sampler), milestones=recipe.milestones)
    training = Training(model=train_model, optimizer=optimizer, scheduler=scheduler, loader=loader, recipe=recipe,
                        device=device, precision=resolve_precision(run_cfg.precision, device),
                        seed=run_cfg.seed, ema=ema, scaler=scaler, rank=dist.rank, world_size=dist.world_size,
                        attack_model=attack_forward(model, run_cfg.compile))
    return training, model


def train(recipe: Recipe, data: TrainData, *, run_cfg, dist, out_dir: Path,
          log: Callable[[str], None] = print, live_log=None, run_name: str = "train",
          run_params: Mapping[str, Any] | None = None) -> list[dict]:
    """Train per `recipe` on `data`, resuming from out_dir/train_state.pt when it exists; writes
    model.pt, metrics.csv and, when `data` has a validation split, last.pt. Returns the metrics rows.

    With a validation split model.pt is the epoch (EMA weights when recipe.ema_decay > 0) most
    accurate under recipe.select_attack on it, and last.pt the final one; without, model.pt is final.
    Under torchrun every rank calls this; rank 0 writes the files. `live_log` (pipeline.config.LogConfig,
    None = off) turns on live curves (ml.live_log) named `run_name`, with `run_params` as the W&B config.
    """
    out_dir = Path(out_dir)
    mean, std = channel_stats(data.images)
    t, model = set_up(recipe, data, run_cfg=run_cfg, dist=dist, mean=mean, std=std)
    sampler, state_path = t.loader.sampler, out_dir / STATE_FILE
    info = dict(arch=recipe.arch, num_classes=data.num_classes, in_channels=data.images.shape[-1], mean=mean,
                std=std, class_names=list(data.class_names), dataset=data.dataset, **recipe.checkpoint_info)
    log(f"  training precision {t.precision} on {t.device}")

    # -- resume: weights, optimizer, schedule, EMA, loader position and RNG states of the last checkpoint
    progress = load_training_state(state_path, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler,
                                   loader=t.loader, ema=t.ema, map_location=t.device)
    rows: list[dict] = list(progress["rows"]) if progress else []
    first_epoch = progress["epoch"] if progress else 0
    start_batch = progress["batch"] if progress else 0
    totals = progress["totals"] if progress else None
    if progress:
        log(f"  resumed from checkpoint at epoch {first_epoch + 1}, batch {start_batch}")
    t.live = open_scalar_log(out_dir, live_log, run_name, dist.rank, params=run_params,
                             start_step=t.scheduler.last_epoch if progress else None)
    # The epochs already done wrote their best model.pt; later epochs must beat it.
    best = max([r["val_pgd_acc"] for r in rows if "val_pgd_acc" in r], default=-1.0)

    def checkpoint(epoch: int, snapshot: dict | None) -> None:
        if dist.is_main:
            save_training_state(state_path, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler,
                                loader=t.loader, ema=t.ema,
                                progress={"epoch": epoch, "batch": snapshot["batch"] if snapshot else 0,
                                          "totals": snapshot, "rows": rows})

    for epoch in range(first_epoch, recipe.epochs):
        # -- one epoch, from the resume point when there is one
        sampler.set_epoch(epoch)
        sampler.load_state_dict({"epoch": epoch, "batch": start_batch})
        stats = train_one_epoch(t, epoch, start_batch=start_batch, totals=totals, checkpoint=checkpoint,
                                checkpoint_every_s=run_cfg.checkpoint_every_s, progress_bar=dist.is_main)
        if not math.isfinite(stats["loss"]):
            from pipeline.core.errors import UserError

            raise UserError(f"training diverged: the loss became {stats['loss']} in epoch {epoch + 1}. Lower the "
                            f"learning rate (or use run.precision = \"fp32\") and run again; the diverged state "
                            f"is not kept as a result.")
        row = {"epoch": epoch + 1, "step": t.scheduler.last_epoch, "lr": t.optimizer.param_groups[0]["lr"], **stats}

        # -- validation: the epoch most accurate under the selection attack becomes model.pt
        if data.validating:
            scored = t.ema.model if t.ema is not None else unwrap(t.model)
            # Each rank ends the epoch with its own last batch's BatchNorm statistics; score rank 0's, the
            # ones it saves, so the summed accuracy (and `best`) is the same on every rank.
            distributed.broadcast_buffers(scored)
            shard = dict(device=t.device, batch_size=recipe.eval_batch_size, rank=dist.rank,
                         world_size=dist.world_size)
            row["val_clean_acc"] = evaluate(scored, data.val_images, data.val_labels, desc="val", **shard)
            row["val_pgd_acc"] = evaluate(scored, data.val_images, data.val_labels, attack=recipe.select_attack,
                                          seed=run_cfg.seed, desc="val pgd", **shard)
            if row["val_pgd_acc"] > best:
                best = row["val_pgd_acc"]
                if dist.is_main:
                    save_model(out_dir / "model.pt", scored, best_epoch=epoch + 1, **info)

        # -- the epoch's record, then the epoch-end checkpoint (a resume starts the next epoch at batch 0)
        rows.append(row)
        if t.live is not None:  # NaN = not measured (train_adv_acc of natural training)
            t.live.scalars(row["step"], {f"epoch/{k}": v for k, v in row.items() if k != "step" and v == v})
        log("  epoch {epoch}/{epochs}: loss {loss:.4f}, train acc {train_acc:.3f}, {images_per_s:.0f} img/s"
            .format(epochs=recipe.epochs, **row))
        if dist.is_main:
            write_metrics(out_dir / "metrics.csv", rows)
        start_batch, totals = 0, None
        checkpoint(epoch + 1, None)

    # -- the final weights (the EMA's when there is one)
    if dist.is_main:
        final = t.ema.model if t.ema is not None else model
        save_model(out_dir / ("last.pt" if data.validating else "model.pt"), final, best_epoch=recipe.epochs, **info)
        if data.validating:
            log(f"  model.pt is epoch {int(np.nanargmax([r['val_pgd_acc'] for r in rows])) + 1} "
                f"(best validation PGD accuracy)")
    if t.live is not None:
        t.live.close()
    return rows


def train_one_epoch(t: Training, epoch: int, *, start_batch: int = 0, totals: dict | None = None,
                    checkpoint: Callable[[int, dict], None] | None = None, checkpoint_every_s: float = 60.0,
                    progress_bar: bool = True, batches=None) -> dict:
    """Train on the batches of `t.loader` (or `batches`: (x, y) pairs, or (x, y, from_pool) with a bool
    tensor marking the pool rows) from batch index `start_batch` on.

    `t.recipe.attack(model, x, targets, generator) -> x_adv` (targets: the labels, or ml.losses.Targets when
    the recipe has options) runs with the model in eval mode (BatchNorm uses running statistics and the
    attack does not update them, as in the official MART code); `t.recipe.loss(logits_natural,
    logits_adv, targets)` runs in train mode with separate natural and adversarial forwards. With attack=None
    the loss gets logits_adv=None (natural training). Under torchrun (`t.world_size` > 1) `t.model` is the
    DDP wrapper, the batches this rank's slice of each global batch, and the returned metrics are global.
    """
    batches = t.loader if batches is None else batches
    recipe = t.recipe
    raw_model = unwrap(t.model)
    attack_model = raw_model if t.attack_model is None else t.attack_model
    amp = autocast(t.device, t.precision)
    generator = torch.Generator(device=t.device)  # re-seeded per batch: building one costs more than seeding it
    # Running sums stay on the device: a .item() per step would sync the GPU every batch.
    totals = totals or {"loss": 0.0, "correct": 0.0, "adv_correct": 0.0, "seen": 0, "seconds": 0.0}
    loss_sum = torch.zeros((), device=t.device, dtype=torch.float64) + totals["loss"]
    correct = torch.zeros((), device=t.device, dtype=torch.float64) + totals["correct"]
    adv_correct = torch.zeros((), device=t.device, dtype=torch.float64) + totals["adv_correct"]
    seen, seconds_before = totals["seen"], totals["seconds"]
    started = last_checkpoint = time.perf_counter()
    logged = (totals["loss"], totals["correct"], totals["adv_correct"], seen, started)  # the live curves' last write

    def snapshot(next_batch: int) -> dict:
        return {"loss": float(loss_sum), "correct": float(correct), "adv_correct": float(adv_correct),
                "seen": seen, "seconds": seconds_before + time.perf_counter() - started, "batch": next_batch}

    bar = tqdm(desc=f"epoch {epoch + 1}", leave=False, disable=not progress_bar, initial=start_batch,
               total=len(t.loader), mininterval=PROGRESS_INTERVAL_S)
    batch_index = start_batch
    for batch_index, (x, y, *source) in enumerate(batches, start=start_batch):
        # DDP keeps the weights equal; the BatchNorm statistics each rank updated on its own slice are
        # replaced by rank 0's (the ones checkpointed), as DDP's broadcast_buffers would at the forward.
        if t.world_size > 1:
            distributed.broadcast_buffers(raw_model)

        # The recipe options ([mart] pool_cutmix, label smoothing, pool_loss_weight): CutMix boxes among the
        # pool rows, then Targets for the attack and the loss; without options the labels stay a tensor and
        # the losses run the papers' code. CutMix draws from its own stream, so the attack's stays the same.
        targets = y
        if recipe.pool_cutmix > 0 or not recipe.targets.plain:
            from_pool = source[0] if source else None
            mixed = {}
            if recipe.pool_cutmix > 0 and from_pool is not None:
                generator.manual_seed(seed_from(t.seed, epoch, batch_index, t.rank, 2))
                x, partner, share = cutmix(x, from_pool, recipe.pool_cutmix, generator)
                mixed = {"mixed_labels": y[partner], "mixed_share": share}
            targets = recipe.targets(y, from_pool, **mixed)

        # The attack: eval mode, on the unwrapped module so DDP hooks fire once per optimizer step. The
        # rank is part of the seed (as in data.mixed's augmentation): ranks hold different images and must
        # not draw the same start noise. Rank 0's stream is the single-process one (SeedSequence pads its
        # 4-word pool with zeros, so (s, e, b, 0) seeds as (s, e, b)).
        x_adv = None
        if recipe.attack is not None:
            raw_model.eval()
            generator.manual_seed(seed_from(t.seed, epoch, batch_index, t.rank))
            with amp:
                x_adv = recipe.attack(attack_model, x, targets, generator)

        # The loss: train mode, natural and adversarial forwards kept separate (BatchNorm sees each).
        # Under DDP two forwards before one backward are correct: each parameter's gradient accumulator
        # runs once per backward (summing both uses), so DDP's hook all-reduces it once; see
        # ml.devices.prepare_for_training for why no no_sync/static_graph/concatenation/buffer broadcast.
        t.model.train()
        with amp:
            logits_natural = t.model(x)
            logits_adv = t.model(x_adv) if x_adv is not None else None
            loss = recipe.loss(logits_natural.float(), None if logits_adv is None else logits_adv.float(), targets)

        # The update: backward, optimizer and schedule steps, EMA.
        t.optimizer.zero_grad(set_to_none=True)
        if t.scaler is not None:  # fp16 only: bf16 has fp32's exponent range and needs no scaling
            t.scaler.scale(loss).backward()
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            loss.backward()
            t.optimizer.step()
        t.scheduler.step()
        if t.ema is not None:
            t.ema.update(raw_model)

        # Running sums, on the device (no host sync).
        with torch.no_grad():
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits_natural.argmax(1) == y).sum()
            if logits_adv is not None:
                adv_correct += (logits_adv.argmax(1) == y).sum()
        seen += y.numel()
        bar.update()

        # Live curves: the means since the last write, every live.every_steps optimizer steps (the float()
        # calls sync the GPU once per interval). Rank 0's slice; images/s scaled to the whole job.
        if t.live is not None and t.scheduler.last_epoch % t.live.every_steps == 0:
            now = (float(loss_sum), float(correct), float(adv_correct), seen, time.perf_counter())
            n = max(1, now[3] - logged[3])
            values = {"train/loss": (now[0] - logged[0]) / n, "train/acc": (now[1] - logged[1]) / n,
                      "train/lr": t.optimizer.param_groups[0]["lr"],
                      "train/images_per_s": n * t.world_size / max(now[4] - logged[4], 1e-9)}
            if logits_adv is not None:  # the training attack's success: adversarial examples misclassified
                values["train/attack_success"] = 1 - (now[2] - logged[2]) / n
            t.live.scalars(t.scheduler.last_epoch, values)
            logged = now

        # Mid-epoch checkpoint: a kill loses at most checkpoint_every_s seconds of work.
        if checkpoint is not None and time.perf_counter() - last_checkpoint >= checkpoint_every_s:
            checkpoint(epoch, snapshot(batch_index + 1))
            last_checkpoint = time.perf_counter()
    bar.close()
    final = snapshot(batch_index + 1)
    if t.world_size > 1:
        # Metrics over the global batch, one all-reduce per epoch; seconds stay rank 0's (ranks run in
        # lockstep), so images_per_s is the whole job's throughput. After a mid-epoch resume every rank
        # starts from rank 0's saved partial sums (the only ones saved): that epoch's figures estimate
        # the other ranks' share by rank 0's.
        sums = torch.tensor([final["loss"], final["correct"], final["adv_correct"], final["seen"]],
                            dtype=torch.float64, device=t.device)
        distributed.all_reduce_sum(sums)
        final.update(loss=float(sums[0]), correct=float(sums[1]), adv_correct=float(sums[2]), seen=int(sums[3]))
    seen_total = max(1, final["seen"])
    return {
        "loss": final["loss"] / seen_total,
        "train_acc": final["correct"] / seen_total,
        "train_adv_acc": final["adv_correct"] / seen_total if recipe.attack is not None else float("nan"),
        "images_per_s": final["seen"] / max(final["seconds"], 1e-9),
        "seconds": final["seconds"],
    }


def write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, pd.DataFrame(rows, columns=METRIC_COLUMNS + sorted(
        {k for r in rows for k in r} - set(METRIC_COLUMNS))))
