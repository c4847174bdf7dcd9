"""Stage 1, teacher: natural (non-robust) training on the labeled set.

RST pseudo-labels its pool with a standard classifier: a natural teacher is more accurate than a
robust one, and pseudo-label accuracy bounds what the pool can teach the robust student.
"""
from __future__ import annotations

import torch

from data.augment import random_crop_flip
from data.mixed import MixedBatchLoader, MixedBatchSampler
from data.sources import LABELED
from pipeline import distributed
from pipeline.stage import Stage
from stages import loops
from stages.models import build_model, load_model, save_model



def augmenter(enabled: bool, image_size: int):
    """Random crop (padding 4 at 32 px, 2 at 28 px, as in the references) and horizontal flip."""
    if not enabled:
        return None
    padding = max(1, image_size // 8)
    return lambda x, generator: random_crop_flip(x, padding=padding, flip=True, generator=generator)


def run(ctx) -> None:
    cfg, run_cfg = ctx.config.teacher, ctx.config.run
    device = loops.resolve_device(run_cfg.device, ctx.dist.local_rank)
    split = ctx.sources["labeled"]
    labeled = split.dataset
    images = labeled.train_images[split.labeled_index]
    labels = labeled.train_labels[split.labeled_index]
    height, width, channels = labeled.image_shape
    mean, std = loops.channel_stats(images)

    torch.manual_seed(run_cfg.seed)
    model = build_model(cfg.arch, num_classes=labeled.num_classes, in_channels=channels, mean=mean, std=std)
    train_model, scaler = loops.prepare_for_training(model, run_cfg=run_cfg, device=device,
                                                     distributed=ctx.dist.enabled)
    sampler = MixedBatchSampler(len(images), 0, batch_size=cfg.batch_size, unsup_fraction=0.0,
                                epoch_size=max(len(images), cfg.batch_size), seed=run_cfg.seed,
                                rank=ctx.dist.rank, world_size=ctx.dist.world_size)
    loader = MixedBatchLoader(sampler, images, labels, images[:0], labels[:0], device=device,
                              augment=augmenter(cfg.augment, height), seed=run_cfg.seed,
                              prefetch=max(1, run_cfg.num_workers))
    optimizer = loops.make_optimizer(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = loops.make_scheduler(optimizer, schedule=cfg.schedule, epochs=cfg.epochs,
                                     steps_per_epoch=len(sampler), milestones=cfg.milestones)
    loops.fit(model=train_model, sampler=sampler, loader=loader, optimizer=optimizer, scheduler=scheduler,
              epochs=cfg.epochs, loss_fn=loops.natural_loss, attack=None, device=device,
              precision=run_cfg.precision, seed=run_cfg.seed, state_path=ctx.out_dir / "train_state.pt",
              metrics_path=ctx.out_dir / "metrics.csv", checkpoint_every_s=run_cfg.checkpoint_every_s,
              is_main=ctx.dist.is_main, scaler=scaler, log=ctx.log, rank=ctx.dist.rank,
              world_size=ctx.dist.world_size)

    if ctx.dist.is_main:
        save_model(ctx.out_dir / "model.pt", model, arch=cfg.arch, num_classes=labeled.num_classes,
                   in_channels=channels, mean=mean, std=std, class_names=list(labeled.class_names),
                   dataset=labeled.name)
    distributed.barrier()  # under torchrun every rank scores a shard of the test set with rank 0's file
    # Evaluate the saved checkpoint, not the live module: what users load is what gets measured.
    saved = load_model(ctx.out_dir / "model.pt", device=device, channels_last=run_cfg.channels_last)
    accuracy = loops.evaluate(saved, labeled.test_images, labeled.test_labels, device=device,
                              desc="teacher test", rank=ctx.dist.rank, world_size=ctx.dist.world_size)
    if ctx.dist.is_main:
        loops.write_results(ctx.out_dir / "results.csv", [
            {"model": "teacher", "split": "test", "attack": "clean", "eps": 0.0, "accuracy": accuracy,
             "n": len(labeled.test_labels)}])
        ctx.log(f"  teacher test accuracy {accuracy:.4f}")
        (ctx.out_dir / "train_state.pt").unlink(missing_ok=True)


STAGE = Stage(
    name="teacher", version=2, section="teacher", run=run, inputs=lambda config: (LABELED,),
    outputs=("model.pt", "metrics.csv", "results.csv"),
    extra_params=("data.num_labeled", "run.seed", "run.precision"))
