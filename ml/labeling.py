"""The pseudolabel stage's work: pool rows through the teacher into HDF5 (read ahead and written behind
in threads where a core is spare, resumable per block), shard merging under torchrun, the test-set
near-duplicate filter, and the per-class cut to the most confident rows (keep_top_fraction)."""
from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from data.mixed import prefetch_depth
from data.pseudolabel_writer import PseudoLabelWriter
from ml.devices import autocast
from ml.evaluation import to_tensor_images


class NearDuplicateFilter:
    """Flags pool images within `threshold` (L2 on flattened [0,1] pixels) of any test image.

    RST removed such near-duplicates of CIFAR-10's test set from its TinyImages pool, or the robust
    accuracy measured afterwards would partly be memorisation. Distances come from blocked matrix
    products: |a-b|^2 = |a|^2 + |b|^2 - 2 a.b, in float64 (on the stage's device) so the cancellation stays exact.
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


class _RunAtSubmit:
    """An executor that runs each call when it is submitted: for a CPU whose cores all run torch's
    threads, where a reading or writing thread would preempt a member of torch's OpenMP team and stall
    every barrier of the forward (data.mixed.prefetch_depth)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        done = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as e:  # re-raised by result(), where a thread's failure would be
            done.set_exception(e)
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


# How often the pseudo-labels written so far are made durable and counted (flush + fsync): at most this much
# labelling is redone after a kill, and a fast teacher (tiny-cnn on a CPU: ~10 blocks a second) does not
# spend 7% of its time in a flush and an fsync per block. A slow teacher commits every block.
COMMIT_SECONDS = 2.0


def _worker(name: str, threaded: bool):
    return ThreadPoolExecutor(1, thread_name_prefix=name) if threaded else _RunAtSubmit()


def shard_path(out_dir: Path, start: int, stop: int) -> Path:
    return out_dir / "shards" / f"rows-{start:012d}-{stop:012d}.h5"


def label_rows(teacher, pool, path: Path, start: int, stop: int, *, total: int, device, precision: str,
               batch_size: int, dedup: NearDuplicateFilter | None, image_shape, num_classes, save_logits, attrs,
               log: Callable[[str], None] = print, progress: bool = True) -> None:
    """Pool rows [start, stop) through `teacher` into `path`, `batch_size` rows a block, resuming at the last
    block committed; rows `dedup` flags are dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The writer's row counts are relative to the shard; pool_index holds the pool's own rows.
    writer = PseudoLabelWriter(path, capacity=stop - start, image_shape=image_shape, num_classes=num_classes,
                               save_logits=save_logits, attrs=attrs, commit_seconds=COMMIT_SECONDS, log=log)
    if writer.resumed:
        log(f"  resumed at pool row {start + writer.pool_rows_done} of {total}")

    try:
        starts = list(range(start + writer.pool_rows_done, stop, batch_size))
        threaded = prefetch_depth(1, device) > 0
        with _worker("pool-read", threaded) as reader, _worker("h5-write", threaded) as write_queue:
            # Threaded: read block i+1 while the teacher runs on block i, write block i while block i+1
            # computes (2 CPU cores, huge pages, 100,000 images: 4,732-5,220 img/s threaded, 5,036-5,625 not).
            next_block = reader.submit(pool.read, starts[0], min(starts[0] + batch_size, stop)) if starts else None
            pending_write = None
            for block_start in tqdm(starts, desc="pseudolabel", unit="block", disable=not progress):
                block_stop = min(block_start + batch_size, stop)
                images = next_block.result()
                if block_stop < stop:
                    next_block = reader.submit(pool.read, block_stop, min(block_stop + batch_size, stop))
                with torch.inference_mode(), autocast(device, precision):
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
        for path, _start, stop in shards:
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


def is_complete(path: Path) -> bool:
    """Whether `path` is a pseudo-label file whose writer finished (a resumed stage need not label again)."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("complete") == 1
    except (OSError, FileNotFoundError):
        return False


def most_confident_rows(labels: np.ndarray, confidence: np.ndarray, fraction: float, num_classes: int) -> np.ndarray:
    """A mask keeping, per class, the ceil(fraction * count) rows of highest confidence; ties go to the
    earlier row, so the choice is the same however the file was written (DM-AT's top 20% per class)."""
    keep = np.zeros(len(labels), dtype=bool)
    for k in range(num_classes):
        rows = np.flatnonzero(labels == k)
        count = math.ceil(round(fraction * len(rows), 6))  # 0.2 * 500,000 is 100,000, not 100,001
        keep[rows[np.argsort(-confidence[rows], kind="stable")[:count]]] = True
    return keep


def keep_most_confident(source: Path, final: Path, fraction: float, *, image_shape, num_classes, save_logits,
                        attrs) -> int:
    """Copy the most confident `fraction` of `source`'s rows per class into `final`, in pool order; returns
    how many. The two 1-D columns are read whole (12 bytes a row); images are copied a block at a time."""
    from data.pseudolabel_file import iter_column_blocks

    columns = [block for block in iter_column_blocks(source, ("labels", "confidence"), 1 << 20)]
    labels = np.concatenate([c["labels"] for c in columns]) if columns else np.zeros(0, np.int64)
    confidence = np.concatenate([c["confidence"] for c in columns]) if columns else np.zeros(0, np.float32)
    keep = most_confident_rows(labels, confidence, fraction, num_classes)
    names = ("images", "labels", "confidence", "pool_index") + (("logits",) if save_logits else ())
    final.unlink(missing_ok=True)  # a filter killed half-way is redone from the complete source
    writer = PseudoLabelWriter(final, capacity=int(keep.sum()), image_shape=image_shape, num_classes=num_classes,
                               save_logits=save_logits, attrs=attrs)
    step = writer.rows_per_chunk * 8
    try:
        with h5py.File(source, "r") as f:
            pool_rows = int(f.attrs["pool_rows_done"])
            for a in range(0, len(labels), step):
                b = min(a + step, len(labels))
                block = {name: f[name][a:b][keep[a:b]] for name in names}
                done = pool_rows if b == len(labels) else int(f["pool_index"][b - 1]) + 1
                writer.append(**block, pool_rows_done=done)
            if len(labels) == 0:
                writer.append(**{name: f[name][:0] for name in names}, pool_rows_done=pool_rows)
    except BaseException:
        writer.close()
        raise
    writer.finish()
    return int(keep.sum())
