"""Training and evaluation loops shared by the teacher and mart stages.

The loop owns devices, modes (eval for the attack, train for the loss), the optimizer, precision and
checkpoints; attacks and losses are pure functions handed in. Training state is saved at every epoch
end and every `checkpoint_every_s` seconds, so a killed run resumes where it stopped and, on CPU,
ends with the same weights as an uninterrupted one: every random draw comes from generators seeded by
(seed, epoch, batch) or from RNG states saved in the checkpoint.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline import distributed
from pipeline.atomic import atomic_torch_save, atomic_write_csv

_logger = logging.getLogger(__name__)

METRIC_COLUMNS = ["epoch", "step", "loss", "lr", "train_acc", "train_adv_acc", "images_per_s", "seconds"]


# -- devices and precision ---------------------------------------------------------------------------
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA (Ampere and later), or a CPU with AVX-512 BF16 or
    AMX. Elsewhere oneDNN emulates bf16 and a training step runs several times slower than in fp32
    (measured 7-9x on a 2-core AVX2 EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # Private probes (torch 2.x); a torch without them is treated as having no native bf16.
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """run.precision "auto" -> "bf16" where it is native, else "fp32"; other values unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device: torch.device, precision: str):
    """Mixed precision for training forwards; fp32 means no autocast at all."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def seeded_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator on `device` whose seed depends only on `keys` (e.g. seed, epoch, batch)."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


# -- optimizer and schedule --------------------------------------------------------------------------
def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(optimizer, *, schedule: str, epochs: int, steps_per_epoch: int, milestones=()):
    """Per-step LambdaLR: cosine to zero, piecewise x0.1 at each milestone epoch, or constant."""
    total = max(1, epochs * steps_per_epoch)
    bounds = sorted(int(m) * steps_per_epoch for m in milestones)

    def factor(step: int) -> float:
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        if schedule == "piecewise":
            return 0.1 ** sum(step >= b for b in bounds)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# -- weight EMA ------------------------------------------------------------------------------------
class WeightEMA:
    """Exponential moving average of the parameters, with warm-up: decay_t = min(decay, (1+t)/(10+t)).

    Buffers (BatchNorm statistics) are copied from the live model rather than averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = list(self.model.parameters())
        live_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, live_params, 1.0 - decay)
        for ema_b, live_b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(live_b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


# -- training state --------------------------------------------------------------------------------
def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # This process's GPU only: the _all variants switch to every visible GPU, and under torchrun
        # each rank would open a context (hundreds of MB) on every GPU of its node.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        # numpy's state as tensors and ints so the checkpoint loads with weights_only=True
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (attacks and checkpoints use it)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_training_state(path: Path, *, model, optimizer, scheduler, loader, ema, progress: dict) -> None:
    """`loader.state_dict()` is the position after the last batch consumed (its worker runs ahead)."""
    atomic_torch_save({
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader": loader.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": _rng_state(),
        "progress": progress,
    }, path)


def load_training_state(path: Path, *, model, optimizer, scheduler, loader, ema, map_location) -> dict | None:
    """Restore everything saved by save_training_state; None when there is nothing to resume.

    Under torchrun rank 0 saves and every rank loads the same file (the work dir is on a filesystem all
    ranks share), so every rank resumes with the same weights, optimizer state and loader position.
    """
    if not Path(path).exists():
        return None
    state = torch.load(path, map_location=map_location, weights_only=True)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    _set_rng_state(state["rng"])
    return state["progress"]


# -- one epoch -------------------------------------------------------------------------------------
def train_one_epoch(model: nn.Module, batches, optimizer, scheduler, *, loss_fn: Callable, attack: Callable | None,
                    device: torch.device, precision: str, epoch: int, start_batch: int, seed: int,
                    ema: WeightEMA | None = None, scaler=None, checkpoint: Callable[[int, dict], None] | None = None,
                    checkpoint_every_s: float = 60.0, totals: dict | None = None, progress_bar: bool = True,
                    rank: int = 0, world_size: int = 1) -> dict:
    """Train on `batches` (an iterable of (x, y, is_pool) from batch index `start_batch` on).

    `attack(model, x, y, generator) -> x_adv` runs with the model in eval mode (BatchNorm uses running
    statistics and the attack does not update them, as in the official MART code); `loss_fn(logits_natural,
    logits_adv, y)` runs in train mode with separate natural and adversarial forwards. With attack=None
    the loss gets logits_adv=None (natural training). Under torchrun (`world_size` > 1) `model` is the
    DDP wrapper, `batches` this rank's slice of each global batch, and the returned metrics are global.
    """
    # Running sums stay on the device: a .item() per step would sync the GPU every batch.
    totals = totals or {"loss": 0.0, "correct": 0.0, "adv_correct": 0.0, "seen": 0, "seconds": 0.0}
    loss_sum = torch.zeros((), device=device, dtype=torch.float64) + totals["loss"]
    correct = torch.zeros((), device=device, dtype=torch.float64) + totals["correct"]
    adv_correct = torch.zeros((), device=device, dtype=torch.float64) + totals["adv_correct"]
    seen, seconds_before = totals["seen"], totals["seconds"]
    started = last_checkpoint = time.perf_counter()
    raw_model = unwrap(model)

    def snapshot(next_batch: int) -> dict:
        return {"loss": float(loss_sum), "correct": float(correct), "adv_correct": float(adv_correct),
                "seen": seen, "seconds": seconds_before + time.perf_counter() - started, "batch": next_batch}

    bar = tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not progress_bar, initial=start_batch,
               total=len(batches) if hasattr(batches, "__len__") else None)
    batch_index = start_batch
    for batch_index, (x, y, _is_pool) in enumerate(bar, start=start_batch):
        # DDP keeps the weights equal; the BatchNorm statistics each rank updated on its own slice are
        # replaced by rank 0's (the ones checkpointed), as DDP's broadcast_buffers would at the forward.
        if world_size > 1:
            distributed.broadcast_buffers(raw_model)

        # The attack: eval mode, on the unwrapped module so DDP hooks fire once per optimizer step.
        x_adv = None
        if attack is not None:
            raw_model.eval()
            # The rank is part of the seed (as in data.mixed's augmentation): ranks hold different images
            # and must not draw the same start noise. Rank 0's stream is the single-process one
            # (SeedSequence pads its 4-word pool with zeros, so (s, e, b, 0) seeds as (s, e, b)).
            with autocast(device, precision):
                x_adv = attack(raw_model, x, y, seeded_generator(device, seed, epoch, batch_index, rank))
            model.train()

        # The loss: train mode, natural and adversarial forwards kept separate (BatchNorm sees each).
        # Under DDP two forwards before one backward are correct: each parameter's gradient accumulator
        # runs once per backward (summing both uses), so DDP's hook all-reduces it once; see
        # prepare_for_training for why no no_sync/static_graph/concatenation/buffer broadcast.
        model.train()
        with autocast(device, precision):
            logits_natural = model(x)
            logits_adv = model(x_adv) if x_adv is not None else None
            loss = loss_fn(logits_natural.float(), None if logits_adv is None else logits_adv.float(), y)

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 only: bf16 has fp32's exponent range and needs no scaling
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(raw_model)

        with torch.no_grad():
            loss_sum += loss.detach().double() * y.numel()
            correct += (logits_natural.argmax(1) == y).sum()
            if logits_adv is not None:
                adv_correct += (logits_adv.argmax(1) == y).sum()
        seen += y.numel()

        # Mid-epoch checkpoint: a kill loses at most checkpoint_every_s seconds of work.
        if checkpoint is not None and time.perf_counter() - last_checkpoint >= checkpoint_every_s:
            checkpoint(epoch, snapshot(batch_index + 1))
            last_checkpoint = time.perf_counter()
    bar.close()
    final = snapshot(batch_index + 1)
    if world_size > 1:
        # Metrics over the global batch, one all-reduce per epoch; seconds stay rank 0's (ranks run in
        # lockstep), so images_per_s is the whole job's throughput. After a mid-epoch resume every rank
        # starts from rank 0's saved partial sums (the only ones saved): that epoch's figures estimate
        # the other ranks' share by rank 0's.
        sums = torch.tensor([final["loss"], final["correct"], final["adv_correct"], final["seen"]],
                            dtype=torch.float64, device=device)
        distributed.all_reduce_sum(sums)
        final.update(loss=float(sums[0]), correct=float(sums[1]), adv_correct=float(sums[2]), seen=int(sums[3]))
    seen_total = max(1, final["seen"])
    return {
        "loss": final["loss"] / seen_total,
        "train_acc": final["correct"] / seen_total,
        "train_adv_acc": final["adv_correct"] / seen_total if attack is not None else float("nan"),
        "images_per_s": final["seen"] / max(final["seconds"], 1e-9),
        "seconds": final["seconds"],
    }


# -- evaluation ------------------------------------------------------------------------------------
def to_tensor_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] on `device` (converted there: 4x less traffic than float)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, device: torch.device,
             batch_size: int = 256, attack: Callable | None = None, seed: int = 0, desc: str = "eval",
             rank: int = 0, world_size: int = 1) -> float:
    """Accuracy on (images, labels), optionally under `attack(model, x, y, generator)`.

    Always fp32 and eval mode, whatever the training precision: low-precision gradients can vanish and
    overstate robustness. With `world_size` > 1 every rank calls this with the same arguments: each
    scores a contiguous run of whole batches and the correct counts are summed, so every image counts
    exactly once (no DistributedSampler padding) and each batch keeps its single-process seed
    (seed, batch index): the accuracy is the single-process one, on every rank.
    """
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first, stop = distributed.shard_range(len(images), rank, world_size, block=batch_size)
    starts = range(first, stop, batch_size)
    for i, start in enumerate(tqdm(starts, desc=desc, leave=False, disable=rank != 0), start=first // batch_size):
        x = to_tensor_images(images[start:start + batch_size], device)
        y = torch.from_numpy(np.asarray(labels[start:start + batch_size], dtype=np.int64)).to(device)
        if attack is not None:
            x = attack(model, x, y, seeded_generator(device, seed, i))
        with torch.no_grad():
            correct += (model(x).argmax(1) == y).sum()
    if world_size > 1:
        distributed.all_reduce_sum(correct)
    return correct.item() / max(1, len(images))


def natural_loss(logits_natural, logits_adv, targets):
    return F.cross_entropy(logits_natural, targets)


def write_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write_csv(path, pd.DataFrame(rows, columns=METRIC_COLUMNS + sorted(
        {k for r in rows for k in r} - set(METRIC_COLUMNS))))


def write_results(path: Path, rows: list[dict]) -> None:
    """results.csv: model, split, attack, eps, accuracy, n (accuracy as a fraction)."""
    atomic_write_csv(path, pd.DataFrame(rows, columns=["model", "split", "attack", "eps", "accuracy", "n"]))


# -- the epoch loop with resume --------------------------------------------------------------------
def fit(*, model, sampler, loader, optimizer, scheduler, epochs: int, loss_fn: Callable, attack: Callable | None,
        device: torch.device, precision: str, seed: int, state_path: Path, metrics_path: Path,
        checkpoint_every_s: float, is_main: bool = True, ema: WeightEMA | None = None, scaler=None,
        on_epoch_end: Callable[[int], dict] | None = None, log: Callable[[str], None] = print,
        rank: int = 0, world_size: int = 1) -> list[dict]:
    """Train for `epochs`, resuming from `state_path` when it exists; returns the metrics rows.

    `loader` iterates the batches of `sampler`'s current position; `on_epoch_end(epoch)` may add columns
    (validation accuracy) to the epoch's metrics row.
    """
    precision = resolve_precision(precision, device)
    log(f"  training precision {precision} on {device}")
    progress = load_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                   loader=loader, ema=ema, map_location=device)
    rows: list[dict] = list(progress["rows"]) if progress else []
    epoch = progress["epoch"] if progress else 0
    start_batch = progress["batch"] if progress else 0
    totals = progress["totals"] if progress else None
    if progress:
        log(f"  resumed from checkpoint at epoch {epoch + 1}, batch {start_batch}")

    def checkpoint(ep: int, snap: dict | None) -> None:
        if is_main:
            save_training_state(state_path, model=model, optimizer=optimizer, scheduler=scheduler,
                                loader=loader, ema=ema,
                                progress={"epoch": ep, "batch": snap["batch"] if snap else 0, "totals": snap,
                                          "rows": rows})

    for epoch in range(epoch, epochs):
        sampler.set_epoch(epoch)
        sampler.load_state_dict({"epoch": epoch, "batch": start_batch})
        stats = train_one_epoch(model, loader, optimizer, scheduler, loss_fn=loss_fn, attack=attack, device=device,
                                precision=precision, epoch=epoch, start_batch=start_batch, seed=seed, ema=ema,
                                scaler=scaler, checkpoint=checkpoint, checkpoint_every_s=checkpoint_every_s,
                                totals=totals, progress_bar=is_main, rank=rank, world_size=world_size)
        if not math.isfinite(stats["loss"]):
            from pipeline.errors import UserError

            raise UserError(f"training diverged: the loss became {stats['loss']} in epoch {epoch + 1}. Lower the "
                            f"learning rate (or use run.precision = \"fp32\") and run again; the diverged state "
                            f"is not kept as a result.")
        row = {"epoch": epoch + 1, "step": scheduler.last_epoch, "lr": optimizer.param_groups[0]["lr"], **stats}
        if on_epoch_end is not None:
            row.update(on_epoch_end(epoch))
        rows.append(row)
        log("  epoch {epoch}/{epochs}: loss {loss:.4f}, train acc {train_acc:.3f}, {images_per_s:.0f} img/s"
            .format(epochs=epochs, **row))
        if is_main:
            write_metrics(metrics_path, rows)
        start_batch, totals = 0, None
        # The epoch-end checkpoint: resume starts the next epoch at batch 0.
        checkpoint(epoch + 1, None)
    return rows


# -- model placement -------------------------------------------------------------------------------
def prepare_for_training(model: nn.Module, *, run_cfg, device: torch.device, distributed: bool):
    """Move the model and wrap it for training: channels_last, SyncBN, DDP, torch.compile, fp16 scaler.

    Returns (train_model, scaler). Attacks and checkpoints go through `unwrap(train_model)`.
    """
    from pipeline.errors import UserError

    if run_cfg.precision == "fp16" and device.type != "cuda":
        raise UserError("run.precision = \"fp16\" needs a CUDA device (fp16 on CPU is slow and needs loss "
                        "scaling); use run.precision = \"bf16\" on CPU.")
    if run_cfg.precision == "bf16" and not native_bf16(device):
        _logger.warning("run.precision = \"bf16\" on a device without native bf16 is emulated and slower "
                        "than fp32; run.precision = \"auto\" picks bf16 only where it is native.")
    model = model.to(device)
    if run_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if distributed and run_cfg.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = model
    if distributed:
        # MART/TRADES run this wrapper twice (natural, adversarial) before one backward. That is correct
        # with plain DDP: both outputs feed the loss, so every parameter's gradient accumulator runs once
        # per backward (summing both uses) and DDP all-reduces each bucket once; no
        # find_unused_parameters or static_graph needed (tests/distributed checks gradients and weights
        # agree across ranks). Not no_sync() around the natural forward (whether backward syncs follows
        # the last forward, so it changes nothing; it is for gradient accumulation), not one forward of
        # cat([x, x_adv]) (BatchNorm would pool natural and adversarial statistics, unlike the official
        # MART code). forward_sync_buffers=False (torch 2.14's broadcast_buffers=False; buffers still
        # start from rank 0's): train_one_epoch gives every rank rank 0's BatchNorm statistics once per
        # step, before the attack (which runs on the unwrapped module, before any DDP forward could sync
        # them), so all ranks attack the model rank 0 checkpoints and a resumed run repeats an
        # uninterrupted one. DDP's per-forward sync would also rewrite the buffers in place between the
        # two forwards, which breaks backward on cuDNN in torch releases without the fix for
        # pytorch#175024.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    if run_cfg.compile:
        train_model = torch.compile(train_model)
    scaler = torch.amp.GradScaler("cuda") if run_cfg.precision == "fp16" else None
    return train_model, scaler


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 NHWC images on [0, 1] (the model's internal normalisation)."""
    sample = images[:: max(1, len(images) // 10000)].astype(np.float64) / 255.0
    mean = sample.mean(axis=(0, 1, 2))
    std = sample.std(axis=(0, 1, 2)) + 1e-6
    return [float(m) for m in mean], [float(s) for s in std]
