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
from pipeline import distributed
from stages.devices import autocast, resolve_device
from stages.evaluation import to_tensor_images, write_results
from stages.models import load_model

OUTPUTS = ("pseudolabels.h5", "results.csv")


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
    device = resolve_device(run_cfg.device, ctx.dist.local_rank)
    pool = ctx.data.pool
    labeled = ctx.data.labeled
    total = len(pool)
    final = ctx.out_dir / "pseudolabels.h5"
    spec = dict(image_shape=labeled.image_shape, num_classes=labeled.num_classes, save_logits=cfg.save_logits,
                attrs={"num_classes": labeled.num_classes, "class_names": list(labeled.class_names),
                       "pool_name": pool.name, "pool_fingerprint": pool.fingerprint(),
                       "teacher_fingerprint": _teacher_fingerprint(ctx)})
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
    labeled = ctx.data.labeled
    teacher = load_model(ctx.inputs["teacher"] / "model.pt", device=device, channels_last=run_cfg.channels_last)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's row counts are relative to the shard; pool_index holds the pool's own rows.
    writer = PseudoLabelWriter(path, capacity=stop - start, image_shape=image_shape, num_classes=num_classes,
                               save_logits=save_logits, attrs=attrs)
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
                with torch.inference_mode(), autocast(device, run_cfg.precision):
                    logits = teacher(to_tensor_images(images, device)).float()
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


def _teacher_fingerprint(ctx) -> str:
    import json

    return json.loads((ctx.inputs["teacher"] / "stage.json").read_text())["fingerprint"]


def _write_results(ctx, pool) -> None:
    """Pseudo-label accuracy where the pool's labels are known, and the class histogram."""
    reader = PseudoLabelReader(ctx.out_dir / "pseudolabels.h5")
    labels, pool_index = reader.labels, reader.pool_index
    provided = pool.provided_labels() if hasattr(pool, "provided_labels") else None
    truth = provided[pool_index] if provided is not None else None
    # labeled-remainder's provided labels are the dataset's own labels; any other pool's provided labels
    # (RST's extrapolated_targets) come from someone else's classifier, so they measure agreement.
    attack = "pseudolabel" if ctx.config.pool.provider == "labeled-remainder" else "agreement-with-provided"
    rows = [{"model": "teacher", "split": "pool", "attack": attack, "eps": 0.0,
             "accuracy": float((labels == truth).mean()) if truth is not None and len(labels) else float("nan"),
             "n": len(labels)}]
    for k, name in enumerate(ctx.data.labeled.class_names):
        mask = labels == k
        precision = float((truth[mask] == k).mean()) if truth is not None and mask.any() else float("nan")
        rows.append({"model": "teacher", "split": f"pool[label={name}]", "attack": attack, "eps": 0.0,
                     "accuracy": precision, "n": int(mask.sum())})
    write_results(ctx.out_dir / "results.csv", rows)
    if truth is not None:
        ctx.log(f"  pseudo-labels: {rows[0]['accuracy']:.4f} {attack} on {len(labels)} pool images")
