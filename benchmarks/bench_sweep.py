"""A 4-variant sweep three ways: serial, `--launcher local --jobs 2`, `--launcher slurm`; wall time side by side.

The grid is configs/smoke.toml with mart.beta = 1, 6 x mart.unsup_fraction = 0.25, 0.5: one teacher and one
pseudo-label file shared by all four variants, four MART trainings. Each way starts from an empty store
and runs `python -m pipeline sweep` as a user would, so process start-up, planning and (for SLURM)
scheduling count. The cores are split so that the comparison is fair: the serial sweep's one process
gets every core as torch threads; each of the two local jobs gets half of them (the launcher sets
OMP_NUM_THREADS = cores // jobs); the SLURM array tasks ask for half the cores each (--cpus), so two run
at once. The table also says whether each way trained the same MART weights as the serial sweep and
as the local one: on CPUs torch's kernels sum in an order that depends on the thread count, so weights
match only between runs with equal threads (local and SLURM here; tests/launch compares launched and
serial sweeps at equal threads and finds them identical); on GPUs they match whatever the split.
Each way's 1-minute load average at its start is printed: other processes on the machine skew a way's
wall time, so compare figures taken at similar load.

What a 2-core CPU machine can show: that launched sweeps run and agree with the serial one, and their
overhead (a process start per job, the shared-stages job running before the variants, SLURM's
scheduling and polling). It cannot show a speed-up worth having: two 1-thread jobs do about the work of
one 2-thread process, and the teacher, which every variant needs, runs alone first. On a GPU node, where
one training saturates one GPU and the machine has 4-8 of them, --jobs N (one GPU each) should approach
N x the serial sweep's throughput for the variant phase; on SLURM the array spreads variants over nodes.

Runtime: about 1.5 minutes on 2 lightly loaded cores (serial 36 s, --jobs 2 27 s, SLURM 30 s at load
average 2.5), 6 minutes at load average 9; --quick shrinks every stage.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"
GRID = ["--set", "mart.beta=1,6", "--set", "mart.unsup_fraction=0.25,0.5"]
QUICK = ["--set", "teacher.epochs=1", "--set", "data.num_labeled=200", "--set", "pool.limit=128",
         "--set", "mart.epochs=1", "--set", "mart.epoch_size=256", "--set", "mart.eval_n=32"]
WAYS = ("serial", "local", "slurm")


def _model_digest(path: Path) -> str:
    import torch

    state = torch.load(path, weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def bench_sweep(*, ways=WAYS, quick: bool = False, tmp_dir: str | None = None, log=print) -> dict:
    """{way: {"seconds", "models" (variant -> weight digest)} or {"skipped": why}}."""
    cores = len(os.sched_getaffinity(0))
    half = max(1, cores // 2)
    base = Path(tempfile.mkdtemp(prefix="bench-sweep-", dir=tmp_dir))
    results = {}
    try:
        for way in ways:
            if way == "slurm" and shutil.which("sbatch") is None:
                results[way] = {"skipped": "no sbatch here (as root: bash scripts/slurm_local.sh)"}
                continue
            out = base / way / "sweep"
            launch = {"serial": [], "local": ["--launcher", "local", "--jobs", "2"],
                      "slurm": ["--launcher", "slurm", "--cpus", str(half)]}[way]
            env = {**os.environ, "RST_MART_STORE": "", "PYTHONPATH": str(ROOT)}
            load = os.getloadavg()[0]
            if way == "serial":
                env["OMP_NUM_THREADS"] = str(cores)  # one process, every core
            command = [sys.executable, "-m", "pipeline", "sweep", "--config", str(SMOKE), "--workdir", str(out),
                       *(QUICK if quick else []), *GRID, *launch]
            began = time.perf_counter()
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - began
            if proc.returncode != 0:
                raise RuntimeError(f"{way} sweep failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
            models = {d.name: _model_digest(d / "mart" / "model.pt") for d in sorted(out.iterdir())
                      if (d / "mart" / "model.pt").exists()}
            results[way] = {"seconds": seconds, "models": models, "load": load}
            log(f"{way}: {seconds:.1f} s (load average {load:.1f} at start)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return results


def table(results: dict) -> str:
    serial = results.get("serial", {}).get("seconds")

    def same(result, way):
        reference = results.get(way, {}).get("models")
        return "-" if reference is None else ("yes" if result["models"] == reference else "no")

    lines = [f"{'way':<38} {'wall s':>7} {'vs serial':>9} {'load':>5}  same weights as serial / local"]
    labels = {"serial": "serial (1 process, all cores)", "local": "local --jobs 2 (half the cores each)",
              "slurm": "slurm array (--cpus half the cores)"}
    for way, result in results.items():
        if "skipped" in result:
            lines.append(f"{labels[way]:<38} {'-':>7} {'-':>9} {'-':>5}  skipped: {result['skipped']}")
            continue
        ratio = f"{serial / result['seconds']:.2f}x" if serial else "-"
        lines.append(f"{labels[way]:<38} {result['seconds']:>7.1f} {ratio:>9} {result.get('load', float('nan')):>5.1f}"
                     f"  {same(result, 'serial')} / {same(result, 'local')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shrink every stage (a harness check, not a measurement)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated subset of {','.join(WAYS)}")
    args = parser.parse_args(argv)
    from benchmarks.common import machine

    print(f"machine: {machine()}")
    results = bench_sweep(ways=[w for w in args.ways.split(",") if w], quick=args.quick)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
