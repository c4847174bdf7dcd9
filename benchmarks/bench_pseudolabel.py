"""Pseudo-labeling throughput: the stage's streaming path against a bare teacher forward.

Measured: `stages.pseudolabel.run` on a synthetic 32x32x3 uint8 pool written to a temporary .npy and
opened with `data.pools.open_pool("npy", ...)`, with the context the runner would build (a real
`Config`, the teacher's model.pt + stage.json in an upstream directory): block reads in a
read-ahead thread, uint8 -> float conversion, the teacher forward under inference_mode, softmax,
HDF5 appends in a write-behind thread, results.csv. Reference: the same teacher (loaded the same way)
over the same images already in memory as a float tensor, same block size, under inference_mode,
nothing else; once contiguous NCHW, once in channels_last layout (what the stage's
`ml.evaluation.to_tensor_images` hands the teacher: a permuted NHWC tensor, which oneDNN runs faster), so
the I/O overhead is judged against the faster bare forward too. All in images/s, best of `rounds`
interleaved rounds. Target: the stage keeps >= 0.9 of a bare forward's throughput (the streaming
hides its I/O).

Adopted fix: `data/pools.py` `NpyPool.read` reads rows with `np.fromfile`, no memory-map view (README, problem 1).

Runtime: default (10,000 images, small-cnn) about 15 s on 2 cores; --quick (2,000) under 10 s; --full
(resnet18, 10,000) several minutes.

Last seen (2026-12-06, 2-core Xeon with AMX, default sizes, three runs): stage vs bare NCHW 1.59-1.60x, vs bare
channels_last 0.87-0.92x (benchmarks/README.md: the fixed costs of a 1.8 s pass).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    Comparison,
    best_rates,
    print_comparisons,
    print_header,
    quiet_stderr,
    save_teacher,
    synthetic_labeled_set,
    write_npy_pool,
)
from pipeline.core.host_memory import keep_freed_memory

SHAPE = (32, 32, 3)


def stage_context(config, out_dir: Path, teacher_dir: Path, pool, labeled):
    """What pipeline.runner.StageContext carries, for one stage run outside the runner."""
    from pipeline.core.distributed import DistInfo
    from pipeline.stage import StageContext, StageInput

    return StageContext(config=config, out_dir=Path(out_dir),
                        inputs={"teacher": StageInput(Path(teacher_dir), "bench")},
                        sources={"pool": pool, "labeled": types.SimpleNamespace(dataset=labeled)},
                        fingerprint="bench", dist=DistInfo(), log=lambda message: None)


def pseudolabel_config(batch_size: int, precision: str = "fp32"):
    from pipeline.config import Config

    config = Config()
    config.run.device = "cpu"
    config.run.precision = precision
    config.pool.provider = "npy"
    config.pseudolabel.batch_size = batch_size
    return config


def bench_pseudolabel(num_images: int = 10_000, arch: str = "small-cnn", batch_size: int = 512,
                      rounds: int = 2, tmp_dir: str | None = None) -> dict:
    """images/s of the pseudolabel stage and of a bare teacher forward over the same pool."""
    from data.pools import open_pool
    from ml.checkpoints import load_model
    from stages import pseudolabel

    with tempfile.TemporaryDirectory(prefix="bench-pseudolabel-", dir=tmp_dir) as tmp:
        tmp = Path(tmp)
        pool_path = write_npy_pool(tmp / "pool.npy", num_images, SHAPE)
        labeled = synthetic_labeled_set(SHAPE)
        teacher_dir = save_teacher(tmp / "teacher", arch, SHAPE)
        pool = open_pool("npy", {"path": str(pool_path)}, labeled=labeled,
                         remainder_index=np.empty(0, np.int64))
        config = pseudolabel_config(batch_size)
        out_dir = tmp / "pseudolabel.partial"

        def stage_pass() -> int:
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir()
            with quiet_stderr():
                pseudolabel.run(stage_context(config, out_dir, teacher_dir, pool, labeled))
            return num_images

        teacher = load_model(teacher_dir / "model.pt", device="cpu")
        in_memory = torch.from_numpy(np.load(pool_path)).permute(0, 3, 1, 2).float().div_(255).contiguous()

        in_memory_cl = in_memory.contiguous(memory_format=torch.channels_last)

        def bare_pass(images: torch.Tensor):
            def one_pass() -> int:
                with torch.inference_mode():
                    for start in range(0, num_images, batch_size):
                        teacher(images[start:start + batch_size])
                return num_images
            return one_pass

        # Warm-up: oneDNN primitive creation for both layouts, page cache, allocator.
        with torch.inference_mode():
            teacher(in_memory[:batch_size])
            teacher(in_memory_cl[:batch_size])
        passes = {"bare": bare_pass(in_memory), "bare_channels_last": bare_pass(in_memory_cl), "stage": stage_pass}
        rates = best_rates(passes, rounds)
        kept = _rows_written(out_dir / "pseudolabels.h5")
    result = {f"{name}_images_per_s": rate for name, rate in rates.items()}
    result.update(ratio=rates["stage"] / rates["bare"],
                  ratio_channels_last=rates["stage"] / rates["bare_channels_last"],
                  num_images=num_images, rows_written=kept, arch=arch, batch_size=batch_size)
    return result


def _rows_written(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["labels"].shape[0])


def comparisons(result: dict) -> list[Comparison]:
    note = f"{result['arch']}, {result['num_images']} images, block {result['batch_size']}"
    return [Comparison("pseudolabel", "stage vs bare forward (NCHW input)", "stage", result["stage_images_per_s"],
                       "bare NCHW", result["bare_images_per_s"], "img/s", ">=", 0.9, note=note),
            Comparison("pseudolabel", "stage vs bare forward (channels_last input)", "stage",
                       result["stage_images_per_s"], "bare channels_last", result["bare_channels_last_images_per_s"],
                       "img/s", ">=", 0.9, note=note)]


def run(quick: bool = False, full: bool = False) -> list[Comparison]:
    print_header("pseudolabel: streaming stage vs bare teacher forward")
    keep_freed_memory()  # as the runner does before every stage (process-wide: the bare side runs with it too)
    if quick:
        result = bench_pseudolabel(num_images=2_000, arch="small-cnn", rounds=3)
    else:
        result = bench_pseudolabel(num_images=10_000, arch="resnet18" if full else "small-cnn", rounds=2)
    return print_comparisons(comparisons(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true", help="resnet18 teacher")
    args = parser.parse_args()
    run(quick=args.quick, full=args.full)
