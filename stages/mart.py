"""Stage 3, mart: adversarial training with the MART loss on batches mixing labeled and pseudo-labeled
examples (RST), then clean and PGD-20 accuracy on the test set.

Per step: PGD (cross-entropy, eval mode, from x + 0.001 N(0,1)) finds x'; then, in train mode,
L = CE(p(x'), y) - log(1 - max_{k != y} p_k(x')) + beta * KL(p(x) || p(x')) * (1 - p_y(x)).
"""
from __future__ import annotations

import os
import shutil

from data.sources import LABELED
from pipeline.stage import Stage


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

    from data.pseudolabel_file import PseudoLabelReader
    from data.pseudolabel_file import validate_pseudolabels
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
    training.train(recipe, data, run_cfg=run_cfg, dist=ctx.dist, out_dir=ctx.out_dir, log=ctx.log)

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


STAGE = Stage(
    name="mart", version=4, section="mart", run=run, inputs=inputs,
    outputs=("model.pt", "last.pt", "metrics.csv", "results.csv"),
    insignificant=("eval_batch_size", "pool_in_memory"), extra_params=("data.num_labeled", "run.seed", "run.precision"))
