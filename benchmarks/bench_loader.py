"""Batch delivery: `MixedBatchLoader` alone against what MART training consumes.

Measured: images/s delivered by `data.mixed.MixedBatchLoader` over a `MixedBatchSampler` (batch 128,
unsup_fraction 0.5, random crop + flip on, prefetch 2, CPU tensors) with nothing consuming but a loop
that drops the batches, for two pools of 32x32x3 images: in memory (uint8 array) and as a
`data.pseudolabel_file.PseudoLabelReader` over a pseudolabels.h5 written with `PseudoLabelWriter` (uncompressed,
so random gathers take the reader's one-`os.pread`-per-row path; the file is in the page cache).
Reference: the images/s MART training consumes (the stage's loop, its fastest setting, from bench_mart
in the same run, or bf16+channels_last measured here at the quick size when run alone). Target: the
loader delivers >= 5x what training consumes, so its background thread takes at most a fifth of the
time it overlaps.

Adopted fix: `data/pseudolabel_file.py` `PseudoLabelReader.gather` preads uncompressed whole-row chunks
(README, problem 2).

Runtime: default (50 batches per pass, 50,000-image pool, 2 rounds) about 30 s; --quick about 10 s
(plus the MART measurement when run alone).

Last seen (2-core AMD EPYC CPU (avx512_bf16), shared (load average ~8), torch 2.14.1, --threads 1,
--quick, pool 10,000): in memory 16,601 img/s, HDF5 reader 20,090, against MART's 43.0 img/s
(bf16+channels_last, batch 32): 386x, 467x. Before the fix the HDF5 reader gave 2,636 img/s (60x).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import Comparison, best_rates, print_comparisons, print_header, synthetic_images

SHAPE = (32, 32, 3)


def write_pseudolabels(path: Path, pool_images: np.ndarray, labels: np.ndarray, block: int = 4096) -> Path:
    """A complete pseudolabels.h5 holding `pool_images`, written the way the pseudolabel stage writes it."""
    from data.pseudolabel_writer import PseudoLabelWriter

    writer = PseudoLabelWriter(path, capacity=len(pool_images), image_shape=pool_images.shape[1:], num_classes=10,
                               attrs={"class_names": [f"class{k}" for k in range(10)], "pool_name": "bench",
                                      "pool_fingerprint": "bench", "teacher_fingerprint": "bench"})
    for start in range(0, len(pool_images), block):
        stop = min(start + block, len(pool_images))
        writer.append(images=pool_images[start:stop], labels=labels[start:stop],
                      confidence=np.ones(stop - start, np.float32), pool_index=np.arange(start, stop),
                      pool_rows_done=stop)
    writer.finish()
    return Path(path)


def bench_loader(num_labeled: int = 4096, num_pool: int = 50_000, batch_size: int = 128, batches: int = 50,
                 rounds: int = 2, unsup_fraction: float = 0.5, consumer_images_per_s: float | None = None,
                 tmp_dir: str | None = None) -> dict:
    """images/s delivered by MixedBatchLoader with the pool in memory and as a PseudoLabelReader."""
    from data.augment import augmenter
    from data.mixed import MixedBatchLoader, MixedBatchSampler
    from data.pseudolabel_file import PseudoLabelReader

    rng = np.random.default_rng(0)
    images = synthetic_images(num_labeled, SHAPE, 0)
    labels = rng.integers(0, 10, num_labeled).astype(np.int64)
    pool_images = synthetic_images(num_pool, SHAPE, 1)
    pool_labels = rng.integers(0, 10, num_pool).astype(np.int64)

    with tempfile.TemporaryDirectory(prefix="bench-loader-", dir=tmp_dir) as tmp:
        reader = PseudoLabelReader(write_pseudolabels(Path(tmp) / "pseudolabels.h5", pool_images, pool_labels))

        def make_pass(pool, targets):
            sampler = MixedBatchSampler(num_labeled, len(targets), batch_size=batch_size,
                                        unsup_fraction=unsup_fraction, epoch_size=batch_size * batches, seed=0)
            loader = MixedBatchLoader(sampler, images, labels, pool, targets, device="cpu",
                                      augment=augmenter(True, SHAPE[0]), seed=0, prefetch=2)
            epoch = iter(range(10 ** 9))

            def one_pass() -> int:
                sampler.set_epoch(next(epoch))
                delivered = 0
                for x, _y in loader:
                    delivered += len(x)
                return delivered
            return one_pass

        check = np.random.default_rng(1).integers(0, num_pool, 256)
        if not np.array_equal(reader.gather(check), pool_images[check]):
            raise AssertionError("PseudoLabelReader.gather returned wrong rows")
        passes = {"in_memory": make_pass(pool_images, pool_labels), "hdf5": make_pass(reader, reader.labels)}
        rates = best_rates(passes, rounds)
        reader.close()

    result = {f"{name}_images_per_s": rate for name, rate in rates.items()}
    result.update(batch_size=batch_size, batches=batches, num_pool=num_pool)
    if consumer_images_per_s is None:
        from benchmarks.bench_mart import bench_mart, fastest_setting, fastest_stage_images_per_s

        consumer_images_per_s = fastest_stage_images_per_s(
            bench_mart(batch_size=32, train_steps=2, rounds=1, stage_settings=(fastest_setting(),)))
    result["mart_images_per_s"] = consumer_images_per_s
    for name, rate in rates.items():
        result[f"ratio_{name}"] = rate / consumer_images_per_s
    return result


def comparisons(result: dict) -> list[Comparison]:
    note = f"batch {result['batch_size']}, pool {result['num_pool']}, augment on"
    return [Comparison("loader", f"loader, {pool} vs MART", f"loader, {pool}",
                       result[f"{key}_images_per_s"], "MART stage", result["mart_images_per_s"], "img/s", ">=", 5.0,
                       note=note)
            for key, pool in (("in_memory", "pool in memory"), ("hdf5", "pool HDF5 reader"))]


def run(quick: bool = False, consumer_images_per_s: float | None = None) -> list[Comparison]:
    print_header("loader: MixedBatchLoader delivery vs MART training consumption")
    if quick:
        result = bench_loader(num_pool=10_000, batches=20, consumer_images_per_s=consumer_images_per_s)
    else:
        result = bench_loader(num_pool=50_000, batches=50, consumer_images_per_s=consumer_images_per_s)
    return print_comparisons(comparisons(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mart-images-per-s", type=float, default=None,
                        help="MART consumption to compare with (default: measure it at the quick size)")
    args = parser.parse_args()
    run(quick=args.quick, consumer_images_per_s=args.mart_images_per_s)
