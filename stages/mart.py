"""Stage 3, mart: adversarial training with the MART loss on batches mixing labeled and pseudo-labeled
examples (RST), then clean and PGD-20 accuracy on the test set.

Per step: PGD (cross-entropy, eval mode, from x + 0.001 N(0,1)) finds x'; then, in train mode,
L = CE(p(x'), y) - log(1 - max_{k != y} p_k(x')) + beta * KL(p(x) || p(x')) * (1 - p_y(x)).
"""
from __future__ import annotations

import functools
import shutil

import numpy as np
import torch

from data.h5store import PseudoLabelReader, validate_pseudolabels
from data.mixed import MixedBatchLoader, MixedBatchSampler
from data.sources import LABELED
from pipeline import distributed
from pipeline.stage import Stage
from stages import loops
from stages.attacks import pgd_linf
from stages.losses import ATTACK_LOSS, LOSSES, mart_loss  # noqa: F401  (mart_loss: public, stages.mart.mart_loss)
from stages.models import build_model, load_model, save_model
from stages.teacher import augmenter

EVAL_STEPS = 20  # PGD-20, the papers' headline white-box attack


def inputs(config) -> tuple:
    """Supervised MART (unsup_fraction 0) needs no teacher and no pool."""
    return (LABELED, "pseudolabel") if config.mart.unsup_fraction > 0 else (LABELED,)


def eval_attack(eps: float, steps: int = EVAL_STEPS):
    """PGD with a uniform random start and Madry's step rule (2.5 eps / steps)."""
    return lambda model, x, y, generator: pgd_linf(
        model, x, y, eps=eps, step_size=2.5 * eps / steps, steps=steps, loss="ce", random_start="uniform",
        generator=generator)


def _pool_images(reader: PseudoLabelReader, pool_in_memory: str):
    """The pool's images in RAM when they fit under `pool_in_memory` GiB ("auto": a quarter of the
    available memory), else the reader, which gathers whole chunks per batch."""
    import os

    need = len(reader) * int(np.prod(reader.image_shape))
    if pool_in_memory == "auto":
        limit = 0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        limit = float(pool_in_memory) * 2**30
    return reader.load_images() if need <= limit else reader


def run(ctx) -> None:
    cfg, run_cfg = ctx.config.mart, ctx.config.run
    device = loops.resolve_device(run_cfg.device, ctx.dist.local_rank)
    split = ctx.sources["labeled"]
    labeled = split.dataset
    height, width, channels = labeled.image_shape

    # Hold out a validation split of the labeled images for picking the best epoch by PGD accuracy.
    index = split.labeled_index
    rng = np.random.default_rng([run_cfg.seed, 1])
    shuffled = rng.permutation(index)
    val_index, train_index = np.sort(shuffled[:cfg.val_size]), np.sort(shuffled[cfg.val_size:])
    images, labels = labeled.train_images[train_index], labeled.train_labels[train_index]

    if cfg.unsup_fraction > 0:
        h5_path = ctx.inputs["pseudolabel"].path / "pseudolabels.h5"
        validate_pseudolabels(h5_path)
        reader = PseudoLabelReader(h5_path)
        pool_images, pool_targets = _pool_images(reader, cfg.pool_in_memory), reader.labels
    else:
        pool_images, pool_targets = images[:0], labels[:0]
    # RST's epoch: as many examples as there are labeled images (CIFAR-10: 50K, half of them from the pool).
    epoch_size = cfg.epoch_size or len(images)
    mean, std = loops.channel_stats(images)

    torch.manual_seed(run_cfg.seed)
    model = build_model(cfg.arch, num_classes=labeled.num_classes, in_channels=channels, mean=mean, std=std)
    train_model, scaler = loops.prepare_for_training(model, run_cfg=run_cfg, device=device,
                                                     distributed=ctx.dist.enabled)
    ema = loops.WeightEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    sampler = MixedBatchSampler(len(images), len(pool_targets), batch_size=cfg.batch_size,
                                unsup_fraction=cfg.unsup_fraction, epoch_size=max(epoch_size, cfg.batch_size),
                                seed=run_cfg.seed, rank=ctx.dist.rank, world_size=ctx.dist.world_size)
    loader = MixedBatchLoader(sampler, images, labels, pool_images, pool_targets, device=device,
                              augment=augmenter(cfg.augment, height), seed=run_cfg.seed,
                              prefetch=max(1, run_cfg.num_workers))
    optimizer = loops.make_optimizer(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = loops.make_scheduler(optimizer, schedule=cfg.schedule, epochs=cfg.epochs,
                                     steps_per_epoch=len(sampler), milestones=cfg.milestones)
    train_attack = functools.partial(_training_attack, eps=cfg.epsilon, step_size=cfg.step_size,
                                     steps=cfg.steps, loss=ATTACK_LOSS[cfg.loss])
    loss_fn = functools.partial(LOSSES[cfg.loss], beta=cfg.beta)
    checkpoint_args = dict(arch=cfg.arch, num_classes=labeled.num_classes, in_channels=channels, mean=mean,
                           std=std, class_names=list(labeled.class_names), dataset=labeled.name,
                           epsilon=cfg.epsilon, loss=cfg.loss)
    val_x, val_y = labeled.train_images[val_index], labeled.train_labels[val_index]
    best = {"acc": _best_so_far(ctx.out_dir / "metrics.csv")}
    shard = dict(rank=ctx.dist.rank, world_size=ctx.dist.world_size)  # evaluations split across ranks

    def select_best(epoch: int) -> dict:
        """PGD accuracy on the held-out split; the best epoch's weights become model.pt."""
        if cfg.val_size == 0:
            return {}
        scored = ema.model if ema is not None else loops.unwrap(train_model)
        # Each rank ends the epoch with its own last batch's BatchNorm statistics; score rank 0's, the
        # ones it saves, so the summed accuracy (and `best`) is the same on every rank.
        distributed.broadcast_buffers(scored)
        clean = loops.evaluate(scored, val_x, val_y, device=device, batch_size=cfg.eval_batch_size, desc="val",
                               **shard)
        robust = loops.evaluate(scored, val_x, val_y, device=device, batch_size=cfg.eval_batch_size,
                                attack=eval_attack(cfg.epsilon), seed=run_cfg.seed, desc="val pgd", **shard)
        if robust > best["acc"] and ctx.dist.is_main:
            save_model(ctx.out_dir / "model.pt", scored, best_epoch=epoch + 1, **checkpoint_args)
            best["acc"] = robust
        return {"val_clean_acc": clean, "val_pgd_acc": robust}

    rows = loops.fit(model=train_model, sampler=sampler, loader=loader, optimizer=optimizer, scheduler=scheduler,
                     epochs=cfg.epochs, loss_fn=loss_fn, attack=train_attack, device=device,
                     precision=run_cfg.precision, seed=run_cfg.seed, state_path=ctx.out_dir / "train_state.pt",
                     metrics_path=ctx.out_dir / "metrics.csv", checkpoint_every_s=run_cfg.checkpoint_every_s,
                     is_main=ctx.dist.is_main, ema=ema, scaler=scaler, on_epoch_end=select_best, log=ctx.log,
                     **shard)
    if ctx.dist.is_main:
        final = ema.model if ema is not None else model
        save_model(ctx.out_dir / "last.pt", final, best_epoch=cfg.epochs, **checkpoint_args)
        if cfg.val_size == 0:
            shutil.copyfile(ctx.out_dir / "last.pt", ctx.out_dir / "model.pt")
        else:
            ctx.log(f"  model.pt is epoch {int(np.nanargmax([r['val_pgd_acc'] for r in rows])) + 1} "
                    f"(best validation PGD accuracy)")
    distributed.barrier()  # every rank scores its shard of the test set with the files rank 0 wrote
    n = cfg.eval_n or len(labeled.test_labels)
    test_x, test_y = labeled.test_images[:n], labeled.test_labels[:n]
    results = []
    for name, path in (("mart", "model.pt"), ("mart-last", "last.pt")):
        if name == "mart-last" and cfg.val_size == 0:
            continue  # identical to model.pt
        saved = load_model(ctx.out_dir / path, device=device, channels_last=run_cfg.channels_last)
        for attack_name, attack in (("clean", None), (f"pgd{EVAL_STEPS}", eval_attack(cfg.epsilon))):
            accuracy = loops.evaluate(saved, test_x, test_y, device=device, batch_size=cfg.eval_batch_size,
                                      attack=attack, seed=run_cfg.seed, desc=f"{name} {attack_name}", **shard)
            results.append({"model": name, "split": "test", "attack": attack_name,
                            "eps": 0.0 if attack is None else cfg.epsilon, "accuracy": accuracy, "n": n})
            ctx.log(f"  {name} {attack_name}: {accuracy:.4f}")
    if ctx.dist.is_main:
        loops.write_results(ctx.out_dir / "results.csv", results)
        (ctx.out_dir / "train_state.pt").unlink(missing_ok=True)


def _best_so_far(metrics_path) -> float:
    """After a resume, the best validation accuracy of the epochs already done (their model.pt is on disk)."""
    import pandas as pd

    if not metrics_path.exists():
        return -1.0
    done = pd.read_csv(metrics_path)
    return float(done["val_pgd_acc"].max()) if "val_pgd_acc" in done and len(done) else -1.0


def _training_attack(model, x, y, generator, *, eps, step_size, steps, loss):
    """The official MART/TRADES training attack: start at x + 0.001 N(0, 1)."""
    return pgd_linf(model, x, y, eps=eps, step_size=step_size, steps=steps, loss=loss, random_start="normal",
                    init_std=0.001, generator=generator)


STAGE = Stage(
    name="mart", version=3, section="mart", run=run, inputs=inputs,
    outputs=("model.pt", "last.pt", "metrics.csv", "results.csv"),
    insignificant=("eval_batch_size", "pool_in_memory"), extra_params=("data.num_labeled", "run.seed", "run.precision"))
