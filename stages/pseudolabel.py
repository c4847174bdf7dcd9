"""Stage 2, pseudolabel: stream the unlabeled pool through the teacher into `pseudolabels.h5`.

The pool is read block by block (peak memory does not grow with the pool), the next block is read
and the previous one written in background threads while the teacher runs (on a GPU, or a CPU with a
core to spare), and the HDF5 file records how far it got after every block, so a killed run resumes
at the next block. Under torchrun each rank streams a contiguous shard of the pool into a file of its
own and rank 0 merges them in pool order.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import ClassVar

from data.sources import GENERATED, LABELED, POOL
from pipeline.core import distributed
from pipeline.core.checks import Range, at_least, positive
from pipeline.stage import RUNTIME, Stage


@dataclass
class PseudolabelConfig:
    batch_size: int = 512  # pool images per teacher forward
    dedup_test: bool = False  # drop pool images that nearly duplicate a test image (test leakage)
    dedup_threshold: float = 7.843  # L2 distance on [0,1] pixels below which an image is a duplicate (RST: 2000/255)
    save_logits: bool = False  # also store float16 teacher logits (N, K)
    keep_top_fraction: float = 1.0  # per teacher class, the fraction kept, most confident first (DM-AT: 0.2)

    RANGES: ClassVar[dict] = {
        "batch_size": at_least(1, high=2**24),
        "dedup_threshold": positive("an L2 distance on [0, 1] pixels; RST used 2000/255 = 7.843"),
        "keep_top_fraction": Range(0, 1, low_open=True, meaning="the fraction of each class's images kept, most "
                                   "confident first; 1 = all"),
    }


def run(ctx) -> None:
    """Under torchrun each rank labels a contiguous shard of the pool into its own file (an HDF5 file
    takes one writer), and rank 0 concatenates the shards in pool order into the one pseudolabels.h5
    that readers expect. A single process writes pseudolabels.h5 directly."""
    # Heavy modules are imported here, not at module level: `status` reads this module's declaration.
    import h5py

    from ml.checkpoints import load_model
    from ml.devices import resolve_device
    from ml.labeling import NearDuplicateFilter, is_complete, keep_most_confident, label_rows, merge_shards, shard_path

    cfg, run_cfg = ctx.config.pseudolabel, ctx.config.run
    device = resolve_device(run_cfg.device, ctx.dist.local_rank)
    labeled = ctx.sources["labeled"].dataset
    pool = _generated_pool(ctx, labeled) if ctx.config.pool.provider == GENERATED else ctx.sources["pool"]
    total = len(pool)
    final = ctx.out_dir / "pseudolabels.h5"
    # With keep_top_fraction < 1 every row is labeled into `labeled_all` first: the per-class cut needs
    # every confidence.
    filtering = cfg.keep_top_fraction < 1
    labeled_all = ctx.out_dir / "pseudolabels-all.h5" if filtering else final
    spec = dict(image_shape=labeled.image_shape, num_classes=labeled.num_classes, save_logits=cfg.save_logits,
                attrs={"num_classes": labeled.num_classes, "class_names": list(labeled.class_names),
                       "pool_name": pool.name, "pool_fingerprint": pool.fingerprint(),
                       "teacher_fingerprint": ctx.inputs["teacher"].fingerprint})
    # Shards are cut at block boundaries, so every block is the one a single process would run.
    shards = [distributed.shard_range(total, r, ctx.dist.world_size, block=cfg.batch_size)
              for r in range(ctx.dist.world_size)]
    start, stop = shards[ctx.dist.rank]
    # Named by their rows: a rerun with the same world size resumes each shard at its last block, one
    # with another world size starts new shards (a merge is never resumed: it is quick and redone).
    path = shard_path(ctx.out_dir, start, stop) if ctx.dist.enabled else labeled_all
    labeling = not (filtering and is_complete(labeled_all))  # killed while cutting: the labels are all there
    if labeling and (start < stop or not ctx.dist.enabled):  # one process writes its (possibly empty) file regardless
        teacher = load_model(ctx.inputs["teacher"].path / "model.pt", device=device,
                             channels_last=run_cfg.channels_last)
        dedup = NearDuplicateFilter(labeled.test_images, cfg.dedup_threshold, device) if cfg.dedup_test else None
        label_rows(teacher, pool, path, start, stop, total=total, device=device, precision=run_cfg.precision,
                   batch_size=cfg.batch_size, dedup=dedup, log=ctx.log, progress=ctx.dist.is_main, **spec)
    distributed.barrier()
    if not ctx.dist.is_main:  # the others wait at the runner's barrier while rank 0 merges and reports
        return
    if ctx.dist.enabled and labeling:
        merge_shards(labeled_all, [(shard_path(ctx.out_dir, a, b), a, b) for a, b in shards if a < b], total=total,
                     **spec)
    shutil.rmtree(ctx.out_dir / "shards", ignore_errors=True)  # merged, or left by a torchrun attempt
    if filtering:
        kept = keep_most_confident(labeled_all, final, cfg.keep_top_fraction, **spec)
        _log_agreement(ctx, pool, labeled_all, labeled.num_classes)
        labeled_all.unlink()
        ctx.log(f"  keep_top_fraction {cfg.keep_top_fraction}: kept the {kept} most confident of {total} images "
                "per class")
    if cfg.dedup_test:
        with h5py.File(final, "r") as f:
            dropped = total - f["images"].shape[0]
        ctx.log(f"  dedup_test dropped {dropped} pool images within {cfg.dedup_threshold} of a test image")
    _write_results(ctx, pool)


def _write_results(ctx, pool) -> None:
    """results.csv: the teacher's accuracy on the pool where the pool's true labels are known (the
    labeled remainder); quality.csv: per predicted class, how many, how precise, how confident.
    The columns are summed a block of rows at a time: memory does not grow with the pool."""
    import numpy as np
    import pandas as pd

    from data.pseudolabel_file import iter_column_blocks
    from ml.evaluation import write_results
    from pipeline.core.atomic import atomic_write_csv

    class_names = list(ctx.sources["labeled"].dataset.class_names)
    k = len(class_names)
    provided = pool.provided_labels() if hasattr(pool, "provided_labels") else None
    # labeled-remainder's provided labels are the dataset's own labels; a generated pool's are the classes
    # its images were made for; any other pool's (RST's extrapolated_targets) come from someone else's
    # classifier. The last two measure agreement.
    own_labels = ctx.config.pool.provider == "labeled-remainder"
    measured_against = "" if provided is None else ("dataset labels" if own_labels else "conditioning classes"
                                                     if ctx.config.pool.provider == GENERATED else "provided labels")
    count, hits, confidence = np.zeros(k), np.zeros(k), np.zeros(k)
    rows = 0
    columns = ("labels", "confidence", "pool_index")
    for block in iter_column_blocks(ctx.out_dir / "pseudolabels.h5", columns, _SUM_BLOCK):
        labels = block["labels"]
        rows += len(labels)
        count += np.bincount(labels, minlength=k)
        confidence += np.bincount(labels, weights=block["confidence"], minlength=k)
        if provided is not None:
            hits += np.bincount(labels, weights=provided[block["pool_index"]] == labels, minlength=k)

    def quality(name: str, n: float, agreed: float, confidence_sum: float) -> dict:
        return {"class": name, "count": int(n),
                "precision": agreed / n if provided is not None and n else float("nan"),
                "mean_confidence": confidence_sum / n if n else float("nan"), "measured_against": measured_against}

    table = [quality(name, count[c], hits[c], confidence[c]) for c, name in enumerate(class_names)]
    table.append(quality("all", count.sum(), hits.sum(), confidence.sum()))
    atomic_write_csv(ctx.out_dir / "quality.csv", pd.DataFrame(table))
    accuracy = table[-1]["precision"]
    results = [{"model": "teacher", "split": "pool", "attack": "clean", "eps": 0.0, "accuracy": accuracy,
                "n": rows}] if own_labels and provided is not None else []
    write_results(ctx.out_dir / "results.csv", results)
    if provided is not None:
        ctx.log(f"  pseudo-labels: {accuracy:.4f} agree with the {measured_against} on {rows} pool images")


_SUM_BLOCK = 1 << 20  # rows of the 1-D columns summed at a time (about 20 MiB)


def _generated_pool(ctx, labeled):
    """The generate stage's shards as the pool (its fingerprint is the generate stage's), checked against the
    labeled images' shape as any pool is."""
    from data.pool_convert import validate_pool
    from data.pool_shards import ShardedPool

    generated = ctx.inputs[GENERATED]
    pool = ShardedPool(generated.path, generated.fingerprint)
    validate_pool(pool, labeled, ())
    return pool


def _log_agreement(ctx, pool, labeled_all, num_classes: int) -> None:
    """Before the cut: how often the teacher agrees with the labels that came with the pool, on all of it."""
    import numpy as np

    from data.pseudolabel_file import iter_column_blocks

    provided = pool.provided_labels() if hasattr(pool, "provided_labels") else None
    if provided is None:
        return
    agreed = rows = 0
    for block in iter_column_blocks(labeled_all, ("labels", "pool_index"), _SUM_BLOCK):
        agreed += int(np.sum(provided[block["pool_index"]] == block["labels"]))
        rows += len(block["labels"])
    ctx.log(f"  before keep_top_fraction: {agreed / max(rows, 1):.4f} of {rows} pool images agree with the "
            f"pool's labels")


def _inputs(config) -> tuple:
    # A generated pool is the generate stage's output: that stage is an upstream input (its fingerprint is
    # the pool's), not a data source.
    return ("teacher", LABELED, GENERATED if config.pool.provider == GENERATED else POOL)


def results(entry) -> list[dict]:
    """The pseudo-labels' accuracy where the pool's labels are the dataset's own (`pseudolabel.accuracy`), and
    for a generated pool the teacher's agreement with the conditioning classes (`pseudolabel.agreement`)."""
    from stages.reporting import results_rows

    return results_rows(entry / "results.csv",
                        lambda row: "accuracy" if row["split"] == "pool" else f"{row['split']}.{row['attack']}"
                        ) + _agreement(entry / "quality.csv")


def _agreement(path) -> list[dict]:
    """quality.csv's `all` row when it measures the teacher against the classes the images were made for."""
    import csv
    import io

    from pipeline.core.errors import UserError
    from stages.reporting import TABLE_LIMIT_BYTES, exists, read_entry_file, unreadable

    if not exists(path):
        return []
    try:
        text = read_entry_file(path, TABLE_LIMIT_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path} cannot be read as a table ({unreadable(error)}); the entry was damaged after it was "
                        "written. Rebuild it: python -m pipeline run --stages pseudolabel --force.") from None
    for row in csv.DictReader(io.StringIO(text, newline="")):
        if row.get("class") == "all" and row.get("measured_against") == "conditioning classes":
            return [{"metric": "agreement", "value": float(row["precision"]), "n": int(float(row["count"]))}]
    return []


def report(entry) -> str:
    from stages.pseudolabel_report import report as section

    return section(entry)


STAGE = Stage(
    name="pseudolabel", version=2, section="pseudolabel", config=PseudolabelConfig, run=run, default=True,
    results=results, report=report,
    inputs=_inputs,
    outputs=("pseudolabels.h5", "results.csv", "quality.csv"),
    # pool.provider says where the pool comes from and whether its provided labels are the dataset's own;
    # the pool's fingerprint (an input, the generate stage's for a generated pool) already covers it.
    reads=("run.precision", "pool.provider", *RUNTIME), insignificant=("batch_size", "pool.provider", *RUNTIME))
