"""Stage 2, pseudolabel: stream the unlabeled pool through the teacher into `pseudolabels.h5`.

The pool is read block by block (peak memory does not grow with the pool), the next block is read
and the previous one written in background threads while the teacher runs, and the HDF5 file records
how far it got after every block, so a killed run resumes at the next block.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from data.h5store import PseudoLabelWriter
from stages import loops
from stages.models import load_model

OUTPUTS = ("pseudolabels.h5", "results.csv")


class TestSetDeduplicator:
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
    cfg, run_cfg = ctx.config.pseudolabel, ctx.config.run
    device = loops.resolve_device(run_cfg.device, ctx.dist.local_rank)
    pool = ctx.data.pool
    labeled = ctx.data.labeled
    if not ctx.dist.is_main:  # one process writes one HDF5; the other ranks wait at the runner's barrier
        return
    teacher = load_model(ctx.inputs["teacher"] / "model.pt", device=device)
    total = len(pool)
    writer = PseudoLabelWriter(
        ctx.out_dir / "pseudolabels.h5", capacity=total, image_shape=labeled.image_shape,
        num_classes=labeled.num_classes, save_logits=cfg.save_logits,
        attrs={"num_classes": labeled.num_classes, "class_names": list(labeled.class_names),
               "pool_name": pool.name, "pool_fingerprint": pool.fingerprint(),
               "teacher_fingerprint": _teacher_fingerprint(ctx)})
    if writer.resumed:
        ctx.log(f"  resumed at pool row {writer.pool_rows_done} of {total}")
    dedup = TestSetDeduplicator(labeled.test_images, cfg.dedup_threshold, device) if cfg.dedup_test else None
    dropped = 0

    try:
        starts = list(range(writer.pool_rows_done, total, cfg.batch_size))
        with ThreadPoolExecutor(1, thread_name_prefix="pool-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="h5-write") as write_queue:
            # Read block i+1 while the teacher runs on block i; write block i while block i+1 computes.
            next_block = reader.submit(pool.read, starts[0], min(starts[0] + cfg.batch_size, total)) if starts else None
            pending_write = None
            for start in tqdm(starts, desc="pseudolabel", unit="block"):
                stop = min(start + cfg.batch_size, total)
                images = next_block.result()
                if stop < total:
                    next_block = reader.submit(pool.read, stop, min(stop + cfg.batch_size, total))
                with torch.inference_mode(), loops.autocast(device, run_cfg.precision):
                    logits = teacher(loops.to_tensor_images(images, device)).float()
                confidence, labels = torch.softmax(logits, dim=1).max(dim=1)
                keep = np.ones(len(images), dtype=bool)
                if dedup is not None:
                    keep = ~dedup.duplicates(images)
                    dropped += int((~keep).sum())
                if pending_write is not None:
                    pending_write.result()  # rows must land in pool order
                pending_write = write_queue.submit(
                    writer.append, images=images[keep], labels=labels.cpu().numpy()[keep],
                    confidence=confidence.cpu().numpy()[keep], pool_index=np.arange(start, stop)[keep],
                    logits=logits.cpu().numpy()[keep].astype(np.float16) if cfg.save_logits else None,
                    pool_rows_done=stop)
            if pending_write is not None:
                pending_write.result()
    except BaseException:
        writer.close()  # keep what reached the disk: the next run resumes from it
        raise
    writer.finish()
    if dedup is not None:
        ctx.log(f"  dedup_test dropped {dropped} pool images within {cfg.dedup_threshold} of a test image")
    _write_results(ctx, pool)


def _teacher_fingerprint(ctx) -> str:
    import json

    return json.loads((ctx.inputs["teacher"] / "stage.json").read_text())["fingerprint"]


def _write_results(ctx, pool) -> None:
    """Pseudo-label accuracy where the pool's labels are known, and the class histogram."""
    from data.h5store import PseudoLabelReader

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
    loops.write_results(ctx.out_dir / "results.csv", rows)
    if truth is not None:
        ctx.log(f"  pseudo-labels: {rows[0]['accuracy']:.4f} {attack} on {len(labels)} pool images")
