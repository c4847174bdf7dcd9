"""Stage 1, teacher: natural (non-robust) training on the labeled set.

RST pseudo-labels its pool with a standard classifier: a natural teacher is more accurate than a
robust one, and pseudo-label accuracy bounds what the pool can teach the robust student.
"""
from __future__ import annotations

from stages import training
from stages.evaluation import score_checkpoints

OUTPUTS = ("model.pt", "metrics.csv", "results.csv")


def run(ctx) -> None:
    cfg, run_cfg = ctx.config.teacher, ctx.config.run
    labeled = ctx.data.labeled
    images = labeled.train_images[ctx.data.labeled_index]
    data = training.TrainData(images=images, labels=labeled.train_labels[ctx.data.labeled_index],
                              num_classes=labeled.num_classes, class_names=labeled.class_names, dataset=labeled.name)
    recipe = training.Recipe(arch=cfg.arch, epochs=cfg.epochs, batch_size=cfg.batch_size, epoch_size=len(images),
                             lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                             milestones=cfg.milestones, loss=training.natural_loss, augment=cfg.augment)
    training.train(recipe, data, run_cfg=run_cfg, dist=ctx.dist, out_dir=ctx.out_dir, log=ctx.log)
    score_checkpoints(ctx.out_dir, {"teacher": "model.pt"}, {"clean": (None, 0.0)}, labeled.test_images,
                      labeled.test_labels, run_cfg=run_cfg, dist=ctx.dist, log=ctx.log)
    if ctx.dist.is_main:
        (ctx.out_dir / training.STATE_FILE).unlink(missing_ok=True)
