"""Run every benchmark in order, print each comparison and a final summary, write them to a CSV.

    python -m benchmarks.run_all [--quick] [--full] [--threads N] [--only mart,loader] [--out benchmarks/results.csv]

1. pseudolabel  the stage's streaming vs a bare teacher forward          target >= 0.9
2. mart         the stage's MART loop vs a bare reference loop           fp32 >= 1.0, bf16 >= 1.5 (native bf16 only)
3. loader       MixedBatchLoader delivery vs MART consumption            >= 5
4. memory       peak RSS pseudo-labeling a 10x larger pool               <= 1.2x, growth <= 0.25x the pool's
5. diffusion    the diffusion stage's training loop vs a bare diffusers loop   >= 1.0
6. generate     the generate stage vs a bare diffusers sampling loop     >= 0.95
               peak RSS generating 1M vs 100K images                     <= 1.1x

GPU readiness and WRN-28-10 MART images/s and MFU are `python -m benchmarks.gpu_check` (its own table).

Runtime on 2 idle CPU cores: --quick under 2 minutes (134 s with another job loading both cores),
default under 15 minutes (--full: resnet18 teacher in the pseudolabel benchmark, longer). On a shared
machine everything is slower and noisier, and oversubscribed cores hurt 2-thread runs most: `--threads 1`
gives steadier ratios there. Each comparison's two sides are measured alternately in one process, so ratios
hold up better than the absolute numbers.

Last seen: see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import torch

from benchmarks import bench_diffusion, bench_generate, bench_loader, bench_mart, bench_memory, bench_pseudolabel
from benchmarks.common import Comparison, machine

BENCHMARKS = ("pseudolabel", "mart", "loader", "memory", "diffusion", "generate")


def run_all(quick: bool = False, full: bool = False, only=BENCHMARKS) -> list[Comparison]:
    rows: list[Comparison] = []
    mart_result = None
    if "pseudolabel" in only:
        rows += bench_pseudolabel.run(quick=quick, full=full)
    if "mart" in only:
        mart_rows, mart_result = bench_mart.run(quick=quick)
        rows += mart_rows
    if "loader" in only:
        consumer = bench_mart.fastest_stage_images_per_s(mart_result) if mart_result else None
        rows += bench_loader.run(quick=quick, consumer_images_per_s=consumer)
    if "memory" in only:
        rows += bench_memory.run(quick=quick)
    if "diffusion" in only:
        rows += bench_diffusion.run(quick=quick)
    if "generate" in only:
        rows += bench_generate.run(quick=quick)
    return rows


def summary(rows: list[Comparison]) -> str:
    met = sum(r.met is True for r in rows)
    judged = sum(r.met is not None for r in rows)
    lines = [r.line() for r in rows] + [f"{met} of {judged} targets met"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: the whole run in under 2 minutes")
    parser.add_argument("--full", action="store_true", help="resnet18 teacher in the pseudolabel benchmark")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset, in run order")
    parser.add_argument("--out", default="benchmarks/results.csv", help="CSV of every comparison")
    args = parser.parse_args(argv)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    where = machine()
    print(f"machine: {where}")
    print(f"mode: {'quick' if args.quick else 'full' if args.full else 'default'}", flush=True)
    started = time.perf_counter()
    rows = run_all(quick=args.quick, full=args.full, only=only)
    seconds = time.perf_counter() - started

    print(f"\n== summary ({seconds:.0f} s, {'quick' if args.quick else 'full' if args.full else 'default'} sizes)")
    print(summary(rows))
    if args.out:
        frame = pd.DataFrame([r.row() for r in rows])
        frame["machine"] = where
        frame["mode"] = "quick" if args.quick else "full" if args.full else "default"
        frame["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
