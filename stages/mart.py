"""Stage 3, mart: adversarial training with the MART loss on batches mixing labeled and pseudo-labeled
examples (RST), then clean and PGD-20 accuracy on the test set.

Per step: PGD (cross-entropy, eval mode, from x + 0.001 N(0,1)) finds x'; then, in train mode,
L = CE(p(x'), y) - log(1 - max_{k != y} p_k(x')) + beta * KL(p(x) || p(x')) * (1 - p_y(x)).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import ClassVar

from data.sources import LABELED
from pipeline.core.checks import PIXEL_RADIUS, Range, at_least, below_1, fraction
from pipeline.core.errors import UserError
from pipeline.stage import RUNTIME, Stage
from stages.training_section import TRAINING_RANGES, TrainingSection


@dataclass
class MartConfig(TrainingSection):
    SECTION: ClassVar[str] = "mart"

    # The shared keys' defaults for MART's recipe (epochs: of epoch_size examples each; batch_size: labeled and
    # pool images together).
    lr: float = 0.01  # SGD learning rate at the start of the schedule
    weight_decay: float = 3.5e-3  # L2 penalty (MART's ResNet-18 recipe)
    loss: str = "mart"  # mart | trades | pgd-at
    epoch_size: int = 0  # examples per epoch (labeled and pool together); 0 = the number of labeled images, as RST
    beta: float = 6.0  # weight of the misclassification-aware KL term (TRADES: of the KL term)
    epsilon: float = 0.031  # L-inf radius of the training attack, on [0,1] pixels
    step_size: float = 0.007  # PGD step of the training attack, on [0,1] pixels
    steps: int = 10  # PGD steps of the training attack
    unsup_fraction: float = 0.5  # share of each batch drawn (with replacement) from the pseudo-labeled pool
    # load the pool's images into RAM up to this many GiB (0 = read pseudolabels.h5 in chunks); auto = a quarter
    # of the available RAM
    pool_in_memory: str = "auto"
    ema_decay: float = 0.0  # weight EMA decay per step (e.g. 0.995); 0 = no EMA
    # labeled images (fewer than there are) held out to pick the best epoch by PGD accuracy; 0 = keep the last
    val_size: int = 0
    eval_n: int = 0  # test images for the stage's final clean / PGD-20 evaluation; 0 = the whole test set
    eval_batch_size: int = 256  # images per evaluation batch
    # Recipe options of the frontier (README "Training recipe options"); the defaults are the papers' losses.
    # label smoothing of the labeled examples' cross-entropy targets, in [0, 1) (DM-AT: 0.1)
    label_smoothing: float = 0.0
    pool_label_smoothing: float = 0.0  # the same for the pool's pseudo-labeled examples, in [0, 1)
    # probability, per pool example, of a CutMix box from another pool example (Rebuffi et al.)
    pool_cutmix: float = 0.0
    pool_loss_weight: float = 1.0  # weight of each pool example's loss against a labeled one's 1 (RST's w); >= 0

    RANGES: ClassVar[dict] = {
        **TRAINING_RANGES,
        "loss": ("mart", "trades", "pgd-at"),
        "epoch_size": at_least(0, "0 = as many examples as labeled images", high=2**40),
        "beta": at_least(0, "the weight of the robust term; the papers use 5 or 6"),
        "epsilon": PIXEL_RADIUS,
        "step_size": Range(0, 1, low_open=True,
                           meaning="the PGD step on [0, 1] pixels, e.g. 0.007 with epsilon 0.031"),
        "steps": at_least(1, high=10**4),
        "unsup_fraction": fraction("the share of each batch drawn from the pool"),
        "ema_decay": below_1("0 = no EMA, e.g. 0.995"),
        "val_size": at_least(0, "0 = no validation split", high=2**40),
        "eval_n": at_least(0, "0 = the whole test set", high=2**40),
        "eval_batch_size": at_least(1, high=2**24),
        "label_smoothing": below_1("0 = one-hot targets; DM-AT uses 0.1"),
        "pool_label_smoothing": below_1("0 = one-hot targets for the pool's pseudo-labels"),
        "pool_cutmix": fraction("the probability that a pool example gets a CutMix box; 0 = no CutMix"),
        "pool_loss_weight": at_least(0, "1 = pool examples count as much as labeled ones", high=1e6),
    }

    def check(self, config, refuse, world_size: int) -> None:
        if self.pool_in_memory != "auto" and not _is_number_at_least_0(self.pool_in_memory):
            raise refuse("mart.pool_in_memory", "it must be \"auto\" or a number of GiB >= 0 (0 reads the pool "
                                                "from pseudolabels.h5 in chunks)", "")
        super().check(config, refuse, world_size)  # the schedule, and the batch against the world size
        if config.data.num_labeled > 0:
            _check_val_size(self.val_size, config.data.num_labeled, refuse)
        # Each rank takes its slice of the batch's labeled part and of its pool part; the last rank gets
        # the smallest slices, and must not get an empty batch.
        pool_rows = round(self.batch_size * self.unsup_fraction)  # as MixedBatchSampler splits
        labeled_rows = self.batch_size - pool_rows
        if world_size > 1 and labeled_rows // world_size + pool_rows // world_size < 1:
            raise refuse("mart.batch_size", f"split into {labeled_rows} labeled and {pool_rows} pool images, each "
                                            f"shared among {world_size} processes, it leaves some process an "
                                            "empty batch", f"Use a batch of at least {2 * world_size}.")

    def check_sources(self, config, sources: dict) -> None:
        """Once the labeled set is open (its size known even when data.num_labeled = 0)."""
        check_against_labeled(config, len(sources["labeled"].labeled_index))


def check_against_labeled(config, num_labeled_images: int) -> None:
    """Refuse a validation split that would leave no labeled image to train on."""
    def refuse(key: str, problem: str, fix: str) -> UserError:
        return UserError(f"`{key}` is {config.mart.val_size!r}; {problem}. {fix}")

    _check_val_size(config.mart.val_size, num_labeled_images, refuse)


def _check_val_size(val_size: int, num_labeled_images: int, refuse) -> None:
    if val_size >= num_labeled_images:
        raise refuse("mart.val_size", f"the validation split must be smaller than the {num_labeled_images} "
                                      "labeled images, or no labeled image is left to train on",
                     f"Hold out fewer (e.g. --set mart.val_size={num_labeled_images // 10}), label more "
                     "(data.num_labeled), or use 0 to keep the last epoch without a validation split.")


def _is_number_at_least_0(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value >= 0


def inputs(config) -> tuple:
    """Supervised MART (unsup_fraction 0) needs no teacher and no pool."""
    return (LABELED, "pseudolabel") if config.mart.unsup_fraction > 0 else (LABELED,)


def mart_loss(logits_natural, logits_adv, targets, beta=6.0):
    """The paper's MART loss (public as stages.mart.mart_loss; the code lives in ml.losses)."""
    from ml.losses import mart_loss as loss

    return loss(logits_natural, logits_adv, targets, beta=beta)


def recipe_options(cfg) -> dict:
    """The training.Recipe fields of the frontier's options ([mart] label_smoothing, pool_label_smoothing,
    pool_loss_weight, pool_cutmix); their defaults leave the papers' losses."""
    from ml.losses import TargetRecipe

    return {"targets": TargetRecipe(label_smoothing=cfg.label_smoothing, pool_label_smoothing=cfg.pool_label_smoothing,
                                    pool_loss_weight=cfg.pool_loss_weight),
            "pool_cutmix": cfg.pool_cutmix}


def _pool_images(reader, pool_in_memory: str):
    """The pool's images in RAM when they fit under `pool_in_memory` GiB ("auto": a quarter of the
    available memory), else the reader, which gathers whole chunks per batch."""
    import numpy as np

    need = len(reader) * int(np.prod(reader.image_shape))
    if pool_in_memory == "auto":
        limit = 0.25 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        limit = float(pool_in_memory) * 2**30
    return reader.load_images() if need <= limit else reader


def run(ctx) -> None:
    # Heavy modules are imported here, not at module level: `status` reads this module's declaration.
    import functools

    import numpy as np

    from data.pseudolabel_file import PseudoLabelReader, validate_pseudolabels
    from ml import training
    from ml.attacks import EVAL_STEPS, eval_attack, training_attack
    from ml.evaluation import score_checkpoints
    from ml.losses import LOSSES

    cfg, run_cfg = ctx.config.mart, ctx.config.run
    split = ctx.sources["labeled"]
    labeled = split.dataset

    # Hold out a validation split of the labeled images for picking the best epoch by PGD accuracy.
    shuffled = np.random.default_rng([run_cfg.seed, 1]).permutation(split.labeled_index)
    val_index, train_index = np.sort(shuffled[:cfg.val_size]), np.sort(shuffled[cfg.val_size:])
    pool_images = pool_labels = None
    if cfg.unsup_fraction > 0:
        h5_path = ctx.inputs["pseudolabel"].path / "pseudolabels.h5"
        validate_pseudolabels(h5_path)
        reader = PseudoLabelReader(h5_path)
        pool_images, pool_labels = _pool_images(reader, cfg.pool_in_memory), reader.labels
    data = training.TrainData(
        images=labeled.train_images[train_index], labels=labeled.train_labels[train_index],
        num_classes=labeled.num_classes, class_names=labeled.class_names, dataset=labeled.name,
        pool_images=pool_images, pool_labels=pool_labels,
        val_images=labeled.train_images[val_index], val_labels=labeled.train_labels[val_index])
    recipe = training.Recipe(
        arch=cfg.arch, epochs=cfg.epochs, batch_size=cfg.batch_size,
        # RST's epoch: as many examples as there are labeled images (CIFAR-10: 50K, half of them from the pool).
        epoch_size=cfg.epoch_size or len(train_index),
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
        milestones=cfg.milestones, loss=functools.partial(LOSSES[cfg.loss], beta=cfg.beta),
        attack=training_attack(cfg.loss, eps=cfg.epsilon, step_size=cfg.step_size, steps=cfg.steps),
        augment=cfg.augment, unsup_fraction=cfg.unsup_fraction, ema_decay=cfg.ema_decay,
        select_attack=eval_attack(cfg.epsilon), eval_batch_size=cfg.eval_batch_size,
        checkpoint_info={"epsilon": cfg.epsilon, "loss": cfg.loss}, **recipe_options(cfg))
    training.train(recipe, data, run_cfg=run_cfg, dist=ctx.dist, out_dir=ctx.out_dir, log=ctx.log,
                   live_log=ctx.live_log, run_name=f"mart-{ctx.fingerprint[:12]}",
                   run_params={"fingerprint": ctx.fingerprint, **vars(cfg)})

    checkpoints = {"mart": "model.pt", "mart-last": "last.pt"}
    if cfg.val_size == 0:  # the last epoch is the model
        checkpoints.pop("mart-last")
        if ctx.dist.is_main:
            shutil.copyfile(ctx.out_dir / "model.pt", ctx.out_dir / "last.pt")
    n = cfg.eval_n or len(labeled.test_labels)
    attacks = {"clean": (None, 0.0), f"pgd{EVAL_STEPS}": (eval_attack(cfg.epsilon), cfg.epsilon)}
    score_checkpoints(ctx.out_dir, checkpoints, attacks, labeled.test_images[:n], labeled.test_labels[:n],
                      run_cfg=run_cfg, dist=ctx.dist, batch_size=cfg.eval_batch_size, log=ctx.log)
    if ctx.dist.is_main:
        (ctx.out_dir / training.STATE_FILE).unlink(missing_ok=True)


def results(entry) -> list[dict]:
    """Clean and PGD-20 accuracy of the selected model (sweep.csv's `mart.clean`, `mart.pgd20`, the axes
    of sweep.png), and of the last epoch's (`mart.mart-last.clean`, ...) when they differ."""
    from stages.reporting import attack_metric, results_rows

    return results_rows(entry / "results.csv", attack_metric("mart"),
                        axis=lambda row: ("x" if row["attack"] == "clean" else "y") if row["model"] == "mart" else None)


def report(entry) -> str:
    from stages.reporting import csv_table, curves

    return curves(entry, "mart") + "\n" + csv_table(entry, "results.csv")


STAGE = Stage(
    name="mart", version=4, section="mart", config=MartConfig, run=run, inputs=inputs, default=True,
    results=results, report=report, distributed_changes_results=True,
    outputs=("model.pt", "last.pt", "metrics.csv", "results.csv"),
    reads=("data.num_labeled", "run.seed", "run.precision", *RUNTIME),
    insignificant=("eval_batch_size", "pool_in_memory", *RUNTIME))
