"""The generate stage: its sampling throughput against a bare diffusers loop, and its peak memory at 10x the pool.

1. Throughput. Measured: `stages.generate.run` with the context the runner would build (a real Config, the
   generator in the diffusion stage's layout in an upstream directory), making `n` images into HDF5 shards:
   per-image seeded noise, balanced classes, DPM-Solver++ from the training schedule, uint8 conversion,
   HDF5 writes, a fresh output directory each round. Reference: a bare diffusers loop over the same UNet and
   sampler (DPMSolverMultistepScheduler, dpmsolver++, same steps and batch), the noise drawn batch-wise from
   one generator, the uint8 images kept in memory, nothing written. Images/s, best of `rounds` interleaved
   rounds. Target: the stage keeps >= 0.95 of the bare loop's throughput. The UNet is the 268K-parameter
   class-conditional model issue 30 measured (block_out_channels (16, 32, 32), one layer per block, no
   attention, 28x28x1), freshly initialised: its weights do not change the time.
2. Memory. Measured: the stage in a fresh subprocess per pool size (each peak is its own process's VmHWM),
   100,000 vs 1,000,000 images of 28x28x1 from a tiny UNet at 1 step (--quick: 2,000 vs 20,000). Target: the
   larger pool's peak resident set <= 1.1x the smaller's (the stage holds one batch, never the pool).

Runtime: the default sizes take about 17 minutes on 2 cores (the 1M-image child, about 15); --quick about a
minute. Figures: docs/benchmarks/generated-pools.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Comparison, best_rates, print_comparisons, print_header, quiet_stderr

IMAGE_SIZE, CHANNELS, NUM_CLASSES = 28, 1, 10
MIB = 1 << 20


def save_generator(entry: Path, block_out_channels=(16, 32, 32), seed: int = 0) -> Path:
    """A class-conditional UNet2DModel in the diffusion stage's layout, `entry/model/`."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    widths = tuple(block_out_channels)
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(w % g == 0 for w in widths))
    unet = UNet2DModel(sample_size=IMAGE_SIZE, in_channels=CHANNELS, out_channels=CHANNELS, block_out_channels=widths,
                       down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
                       layers_per_block=1, num_class_embeds=NUM_CLASSES, norm_num_groups=groups, add_attention=False)
    model = Path(entry) / "model"
    unet.save_pretrained(model / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(model / "scheduler")
    (model / "rst_mart.json").write_text(json.dumps({"num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE,
                                                     "in_channels": CHANNELS, "dataset": "bench",
                                                     "class_names": [f"class{k}" for k in range(NUM_CLASSES)]}))
    return Path(entry)


def generate_config(n: int, steps: int, batch_size: int, precision: str = "fp32"):
    from pipeline.config import Config

    config = Config()
    config.run.device = "cpu"
    config.run.precision = precision
    config.generate.n, config.generate.steps, config.generate.batch_size = n, steps, batch_size
    config.generate.shard_size = max(n // 4, 1)  # a few shards, as a real pool has
    return config


def run_stage(generator: Path, out_dir: Path, config) -> int:
    from pipeline.core.distributed import DistInfo
    from pipeline.stage import StageContext, StageInput
    from stages.generate import STAGE

    out_dir.mkdir(parents=True)
    ctx = StageContext(config=STAGE.view(config), out_dir=out_dir, inputs={"diffusion": StageInput(generator, "bench")},
                       sources={}, fingerprint="bench", dist=DistInfo(), log=lambda message: None)
    with quiet_stderr():
        STAGE.run(ctx)
    return config.generate.n


def bare_loop(unet, scheduler, n: int, steps: int, batch_size: int, seed: int = 0) -> int:
    """What a user would write with diffusers alone: batch noise, the sampler's loop, uint8 images in memory."""
    generator = torch.Generator().manual_seed(seed)
    kept = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            x = torch.randn((count, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
            classes = torch.arange(start, start + count) % NUM_CLASSES
            scheduler.set_timesteps(steps)
            for t in scheduler.timesteps:
                eps = unet(x, t, class_labels=classes).sample
                x = scheduler.step(eps, t, x).prev_sample
            kept.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return sum(len(k) for k in kept)


def bench_throughput(n: int = 2048, steps: int = 10, batch_size: int = 256, rounds: int = 3,
                     tmp_dir: str | None = None) -> dict:
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        tmp = Path(tmp)
        generator = save_generator(tmp / "diffusion")
        unet = UNet2DModel.from_pretrained(generator / "model" / "unet", use_safetensors=True).eval()
        scheduler = DPMSolverMultistepScheduler.from_pretrained(generator / "model" / "scheduler",
                                                                algorithm_type="dpmsolver++", solver_order=2)
        config = generate_config(n, steps, batch_size)
        made = itertools.count()  # a fresh output directory each round: every shard is made
        rates = best_rates({
            "stage": lambda: run_stage(generator, tmp / f"out-{next(made)}", config),
            "bare": lambda: bare_loop(unet, scheduler, n, steps, batch_size),
        }, rounds)
    return {"stage_images_per_s": rates["stage"], "bare_images_per_s": rates["bare"],
            "ratio": rates["stage"] / rates["bare"], "n": n, "steps": steps, "batch_size": batch_size,
            "parameters": sum(p.numel() for p in unet.parameters())}


# -- memory: one child process per pool size ------------------------------------------------------------------
def child_main(generator: str, out_dir: str, n: int) -> None:
    from benchmarks.bench_memory import _status_kib

    config = generate_config(n, steps=1, batch_size=512)
    config.generate.shard_size = 50_000
    started = time.perf_counter()
    run_stage(Path(generator), Path(out_dir), config)
    print(json.dumps({"peak_rss_kib": _status_kib()["VmHWM"], "seconds": time.perf_counter() - started}))


def _child(generator: Path, out_dir: Path, n: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_generate", "--child", str(generator), str(out_dir),
                           str(n)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"generate child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(small: int = 100_000, large: int = 1_000_000, tmp_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        tmp = Path(tmp)
        generator = save_generator(tmp / "diffusion", block_out_channels=(4, 8))
        measured = {size: _child(generator, tmp / f"pool-{size}", size) for size in (small, large)}
    return {"small": small, "large": large, "small_peak_mib": measured[small]["peak_rss_kib"] / 1024,
            "large_peak_mib": measured[large]["peak_rss_kib"] / 1024,
            "small_seconds": measured[small]["seconds"], "large_seconds": measured[large]["seconds"]}


def comparisons(throughput: dict | None, memory: dict | None) -> list[Comparison]:
    rows = []
    if throughput:
        rows.append(Comparison(
            "generate", f"stage vs bare diffusers loop ({throughput['steps']} DPM-Solver++ steps)", "stage",
            throughput["stage_images_per_s"], "bare", throughput["bare_images_per_s"], "img/s", ">=", 0.95,
            note=f"{throughput['n']} images, batch {throughput['batch_size']}, {throughput['parameters']:,} params"))
    if memory:
        rows.append(Comparison(
            "generate", f"peak RSS at {memory['large']:,} vs {memory['small']:,} images", "large",
            memory["large_peak_mib"], "small", memory["small_peak_mib"], "MiB", "<=", 1.1,
            note=f"{memory['large_seconds']:.0f} s vs {memory['small_seconds']:.0f} s"))
    return rows


def run(quick: bool = False) -> list[Comparison]:
    print_header("generate: sampling throughput and peak memory")
    throughput = bench_throughput(n=512 if quick else 2048, rounds=2 if quick else 3)
    memory = bench_memory(*((2_000, 20_000) if quick else (100_000, 1_000_000)))
    return print_comparisons(comparisons(throughput, memory))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    parser.add_argument("--child", nargs=3, metavar=("GENERATOR", "OUT_DIR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child[0], args.child[1], int(args.child[2]))
        return 0
    run(quick=args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
