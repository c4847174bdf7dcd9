"""Stage 1, teacher: natural (non-robust) training on the labeled set, or an imported classifier.

RST pseudo-labels its pool with a standard classifier: a natural teacher is more accurate than a
robust one, and pseudo-label accuracy bounds what the pool can teach the robust student. A user who
already has one names it with `teacher.checkpoint`; the stage then imports it instead of training
(its fingerprint is the file's digest) and still reports its test accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from data.sources import LABELED
from pipeline.core.fingerprint import file_digest
from pipeline.stage import RUNTIME, Source, Stage
from stages.training_section import TrainingSection


@dataclass
class TeacherConfig(TrainingSection):
    SECTION: ClassVar[str] = "teacher"

    # a classifier to import instead of training one (our model.pt, a state dict, RobustBench/MART/RST); "" = train
    checkpoint: str = ""
    # for an imported checkpoint without its own: [] = [0,1] inputs, ["cifar10"], or [[means], [stds]]
    input_normalization: list = field(default_factory=list)


def run(ctx) -> None:
    # Heavy modules are imported here, not at module level: `status` reads this module's declaration.
    from ml import training
    from ml.evaluation import score_checkpoints

    cfg, run_cfg = ctx.config.teacher, ctx.config.run
    split = ctx.sources["labeled"]
    labeled = split.dataset
    if cfg.checkpoint:
        if ctx.dist.is_main:
            import_teacher(ctx.out_dir, cfg, labeled)
    else:
        images = labeled.train_images[split.labeled_index]
        data = training.TrainData(images=images, labels=labeled.train_labels[split.labeled_index],
                                  num_classes=labeled.num_classes, class_names=labeled.class_names,
                                  dataset=labeled.name)
        recipe = training.Recipe(arch=cfg.arch, epochs=cfg.epochs, batch_size=cfg.batch_size, epoch_size=len(images),
                                 lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                 schedule=cfg.schedule, milestones=cfg.milestones, loss=training.natural_loss,
                                 augment=cfg.augment)
        training.train(recipe, data, run_cfg=run_cfg, dist=ctx.dist, out_dir=ctx.out_dir, log=ctx.log,
                       live_log=ctx.live_log, run_name=f"teacher-{ctx.fingerprint[:12]}",
                       run_params={"fingerprint": ctx.fingerprint, **vars(cfg)})
    score_checkpoints(ctx.out_dir, {"teacher": "model.pt"}, {"clean": (None, 0.0)}, labeled.test_images,
                      labeled.test_labels, run_cfg=run_cfg, dist=ctx.dist, log=ctx.log)
    if ctx.dist.is_main:
        (ctx.out_dir / training.STATE_FILE).unlink(missing_ok=True)


def import_teacher(out_dir: Path, cfg, labeled) -> None:
    """model.pt from `teacher.checkpoint` (weights_only load), and a metrics.csv with no epochs."""
    from ml.checkpoints import import_checkpoint, normalization_stats, save_model
    from ml.training import write_metrics

    channels = labeled.image_shape[2]
    model = import_checkpoint(cfg.checkpoint, arch=cfg.arch, num_classes=labeled.num_classes, in_channels=channels,
                              input_normalization=cfg.input_normalization)
    mean, std = normalization_stats(model)
    save_model(out_dir / "model.pt", model, arch=cfg.arch, num_classes=labeled.num_classes, in_channels=channels,
               mean=mean, std=std, class_names=list(labeled.class_names), dataset=labeled.name,
               imported_from=str(Path(cfg.checkpoint).resolve()), imported_sha256=file_digest(cfg.checkpoint))
    write_metrics(out_dir / "metrics.csv", [])  # nothing was trained


def _checkpoint_fingerprint(config) -> str:
    from ml.checkpoints import checkpoint_digest

    return checkpoint_digest(config.teacher.checkpoint)


CHECKPOINT = Source("teacher_checkpoint", _checkpoint_fingerprint, lambda config, cache_dir: config.teacher.checkpoint)


def inputs(config) -> tuple:
    return (LABELED, CHECKPOINT) if config.teacher.checkpoint else (LABELED,)


def results(entry: Path) -> list[dict]:
    """The teacher's test accuracy: sweep.csv's `teacher.clean`."""
    from stages.reporting import attack_metric, results_rows

    return results_rows(entry / "results.csv", attack_metric("teacher"))


def report(entry: Path) -> str:
    from stages.reporting import csv_table, curves

    return curves(entry, "teacher") + "\n" + csv_table(entry, "results.csv")


STAGE = Stage(
    name="teacher", version=2, section="teacher", config=TeacherConfig, run=run, inputs=inputs, default=True,
    results=results, report=report, distributed_changes_results=True,
    outputs=("model.pt", "metrics.csv", "results.csv"),
    reads=("data.num_labeled", "run.seed", "run.precision", *RUNTIME),
    # The file is known by its digest (an input), so moving it does not re-import it.
    insignificant=("checkpoint", *RUNTIME))
