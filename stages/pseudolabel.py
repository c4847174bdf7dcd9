"""Stage 2, pseudolabel: stream the unlabeled pool through the teacher into `pseudolabels.h5`.

The pool is read block by block (peak memory does not grow with the pool), the next block is read
and the previous one written in background threads while the teacher runs, and the HDF5 file records
how far it got after every block, so a killed run resumes at the next block. Under torchrun each
rank streams a contiguous shard of the pool into a file of its own and rank 0 merges them in pool order.
"""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from data.h5store import PseudoLabelReader, PseudoLabelWriter
from data.sources import LABELED, POOL
from pipeline import distributed
from pipeline.stage import Stage
from stages import loops
from stages.models import load_model


class NearDuplicateFilter:
    """Flags pool images within `threshold` (L2 on flattened [0,1] pixels) of any test image.

    RST removed such near-duplicates of CIFAR-10's test set from its TinyImages pool, or the robust
    accuracy measured afterwards would partly be memorisation. Distances come from blocked matrix
    products: |a-b|^2 = |a|^2 + |b|^2 - 2 a.b, in float64 on the CPU where precision matters.
    """

    def __init__(self, test_images: np.ndarray, threshold: float, device: torch.device, block: int = 4096):
        self.device = device
        self.threshold_sq = threshold ** 2
        self.test = [self._flat(test_images[i:i + block]) for i in range(0, len(test_images), block)]
        self.test_sq = [(t * t).sum(1) for t in self.test]

    def _flat(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.reshape(len(images), -1)).to(self.device).double() / 255.0

    def duplicates(self, images: np.ndarray) -> np.ndarray:
        x = self._flat(images)
        x_sq = (x * x).sum(1, keepdim=True)
        nearest = torch.full((len(images),), float("inf"), dtype=torch.float64, device=self.device)
        for t, t_sq in zip(self.test, self.test_sq):
            d2 = (x_sq + t_sq[None, :] - 2.0 * x @ t.T).amin(1)
            nearest = torch.minimum(nearest, d2)
        return (nearest < self.threshold_sq).cpu().numpy()


def run(ctx) -> None:
    """Under torchrun each rank labels a contiguous shard of the pool into its own file (an HDF5 file
    takes one writer), and rank 0 concatenates the shards in pool order into the one pseudolabels.h5
    that readers expect. A single process writes pseudolabels.h5 directly."""
    cfg, run_cfg = ctx.config.pseudolabel, ctx.config.run
    device = loops.resolve_device(run_cfg.device, ctx.dist.local_rank)
    pool = ctx.sources["pool"]
    labeled = ctx.sources["labeled"].dataset
    total = len(pool)
    final = ctx.out_dir / "pseudolabels.h5"
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
    path = shard_path(ctx.out_dir, start, stop) if ctx.dist.enabled else final
    if start < stop or not ctx.dist.enabled:  # one process writes its (possibly empty) file regardless
        label_rows(ctx, pool, path, start, stop, total=total, device=device, **spec)
    distributed.barrier()
    if not ctx.dist.is_main:  # the others wait at the runner's barrier while rank 0 merges and reports
        return
    if ctx.dist.enabled:
        merge_shards(final, [(shard_path(ctx.out_dir, a, b), a, b) for a, b in shards if a < b], total=total,
                     **spec)
    shutil.rmtree(ctx.out_dir / "shards", ignore_errors=True)  # merged, or left by a torchrun attempt
    if cfg.dedup_test:
        with h5py.File(final, "r") as f:
            dropped = total - f["images"].shape[0]
        ctx.log(f"  dedup_test dropped {dropped} pool images within {cfg.dedup_threshold} of a test image")
    _write_results(ctx, pool)


def shard_path(out_dir: Path, start: int, stop: int) -> Path:
    return out_dir / "shards" / f"rows-{start:012d}-{stop:012d}.h5"


def label_rows(ctx, pool, path: Path, start: int, stop: int, *, total: int, device, image_shape, num_classes,
               save_logits, attrs) -> None:
    """Pool rows [start, stop) through the teacher into `path`, resuming at the last block written."""
    cfg, run_cfg = ctx.config.pseudolabel, ctx.config.run
    labeled = ctx.sources["labeled"].dataset
    teacher = load_model(ctx.inputs["teacher"].path / "model.pt", device=device, channels_last=run_cfg.channels_last)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's row counts are relative to the shard; pool_index holds the pool's own rows.
    writer = PseudoLabelWriter(path, capacity=stop - start, image_shape=image_shape, num_classes=num_classes,
                               save_logits=save_logits, attrs=attrs, log=ctx.log)
    if writer.resumed:
        ctx.log(f"  resumed at pool row {start + writer.pool_rows_done} of {total}")
    dedup = NearDuplicateFilter(labeled.test_images, cfg.dedup_threshold, device) if cfg.dedup_test else None

    try:
        starts = list(range(start + writer.pool_rows_done, stop, cfg.batch_size))
        with ThreadPoolExecutor(1, thread_name_prefix="pool-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="h5-write") as write_queue:
            # Read block i+1 while the teacher runs on block i; write block i while block i+1 computes.
            next_block = reader.submit(pool.read, starts[0], min(starts[0] + cfg.batch_size, stop)) if starts else None
            pending_write = None
            for block_start in tqdm(starts, desc="pseudolabel", unit="block", disable=not ctx.dist.is_main):
                block_stop = min(block_start + cfg.batch_size, stop)
                images = next_block.result()
                if block_stop < stop:
                    next_block = reader.submit(pool.read, block_stop, min(block_stop + cfg.batch_size, stop))
                with torch.inference_mode(), loops.autocast(device, run_cfg.precision):
                    logits = teacher(loops.to_tensor_images(images, device)).float()
                confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
                keep = ~dedup.duplicates(images) if dedup is not None else np.ones(len(images), dtype=bool)
                if pending_write is not None:
                    pending_write.result()  # rows must land in pool order
                pending_write = write_queue.submit(
                    writer.append, images=images[keep], labels=labels.cpu().numpy()[keep],
                    confidence=confidence.cpu().numpy()[keep], pool_index=np.arange(block_start, block_stop)[keep],
                    logits=logits.cpu().numpy()[keep].astype(np.float16) if save_logits else None,
                    pool_rows_done=block_stop - start)
            if pending_write is not None:
                pending_write.result()
    except BaseException:
        writer.close()  # keep what reached the disk: the next run resumes from it
        raise
    writer.finish()


def merge_shards(final: Path, shards: list[tuple[Path, int, int]], *, total: int, image_shape, num_classes,
                 save_logits, attrs) -> None:
    """Concatenate finished shard files (given in pool order) into `final`, a block of chunks at a time."""
    columns = ("images", "labels", "confidence", "pool_index") + (("logits",) if save_logits else ())
    final.unlink(missing_ok=True)  # an unfinished file here (another world size's attempt) must not be resumed
    writer = PseudoLabelWriter(final, capacity=total, image_shape=image_shape, num_classes=num_classes,
                               save_logits=save_logits, attrs=attrs)
    step = writer.rows_per_chunk * 8  # whole chunks: ~24 MiB of images per copy
    try:
        for path, start, stop in shards:
            with h5py.File(path, "r") as f:
                if f.attrs.get("complete") != 1:
                    raise RuntimeError(f"{path}: shard incomplete after every rank finished its rows")
                n = f["images"].shape[0]
                for a in range(0, n, step):
                    b = min(a + step, n)
                    block = {name: f[name][a:b] for name in columns}
                    writer.append(**block, pool_rows_done=stop if b == n else int(block["pool_index"][-1]) + 1)
                if n == 0:  # every row of the shard was dropped (dedup_test): only the bookkeeping moves
                    writer.append(**{name: f[name][:0] for name in columns}, pool_rows_done=stop)
    except BaseException:
        writer.close()
        raise
    writer.finish()


def _write_results(ctx, pool) -> None:
    """results.csv: the teacher's accuracy on the pool where the pool's true labels are known (the
    labeled remainder); quality.csv: per predicted class, how many, how precise, how confident."""
    import pandas as pd

    from pipeline.atomic import atomic_write_csv

    reader = PseudoLabelReader(ctx.out_dir / "pseudolabels.h5")
    labels, confidence, pool_index = reader.labels, reader.confidence, reader.pool_index
    provided = pool.provided_labels() if hasattr(pool, "provided_labels") else None
    truth = provided[pool_index] if provided is not None else None
    # labeled-remainder's provided labels are the dataset's own labels; any other pool's provided labels
    # (RST's extrapolated_targets) come from someone else's classifier, so they measure agreement.
    own_labels = ctx.config.pool.provider == "labeled-remainder"
    measured_against = "" if truth is None else ("dataset labels" if own_labels else "provided labels")

    def quality(name: str, mask: np.ndarray, k: int | None) -> dict:
        hits = (truth[mask] == (labels[mask] if k is None else k)) if truth is not None and mask.any() else None
        return {"class": name, "count": int(mask.sum()),
                "precision": float(hits.mean()) if hits is not None else float("nan"),
                "mean_confidence": float(confidence[mask].mean()) if mask.any() else float("nan"),
                "measured_against": measured_against}

    rows = [quality(name, labels == k, k) for k, name in enumerate(ctx.sources["labeled"].dataset.class_names)]
    rows.append(quality("all", np.ones(len(labels), dtype=bool), None))
    atomic_write_csv(ctx.out_dir / "quality.csv", pd.DataFrame(rows))
    accuracy = rows[-1]["precision"]
    results = [{"model": "teacher", "split": "pool", "attack": "clean", "eps": 0.0, "accuracy": accuracy,
                "n": len(labels)}] if own_labels and truth is not None else []
    loops.write_results(ctx.out_dir / "results.csv", results)
    if truth is not None:
        ctx.log(f"  pseudo-labels: {accuracy:.4f} agree with the {measured_against} on {len(labels)} pool images")


STAGE = Stage(
    name="pseudolabel", version=2, section="pseudolabel", run=run,
    inputs=lambda config: ("teacher", LABELED, POOL),
    outputs=("pseudolabels.h5", "results.csv", "quality.csv"),
    insignificant=("batch_size",), extra_params=("run.precision",))
