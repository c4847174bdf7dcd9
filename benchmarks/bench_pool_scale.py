"""Pools at the field's scale: `status`, pseudolabel and mart through the pipeline CLI, per pool format and size.

Measured, for synthetic 32x32x3 uint8 pools of 500,000 and 5,000,000 images (1.5 and 15 GB; 2,000 and
8,000 with --quick) in four layouts: an uncompressed npz (np.savez layout), the same in 2 npz parts
(named by a glob), an .npy and an HDF5 file. Every number comes from `python -m pipeline` run in a
subprocess on a temporary TOML config and work dir, as a user runs it (labeled set: this module's
`labeled_set`, 512 synthetic images; teacher and student `tiny-cnn` by default, so the pool's I/O is
what shows):
- `status` seconds (wall clock of the command) and peak RSS (the child's VmHWM, written at exit: the
  rusage maxrss of a child also counts the parent's memory at fork) on a finished pipeline, after one
  warm-up `status` (digests cached, files in the page cache). Targets of issue 10: under 2 s and under
  400 MiB on a pool of 1.5 GB; here reported for every size.
- pseudolabel images/s (pool size / the stage's seconds in its stage.json) against a bare forward of
  the same teacher (model.pt) over the pool's first 100,000 images in memory, at the stage's batch size,
  converted and scored as the stage does, one sustained pass (`bare_forward_images_per_s`). Target
  >= 0.9x. The teacher is trained once into a scratch stage store that every work dir shares, so the
  measured `run --stages pseudolabel` does nothing else. Each pool's files are aged an hour after
  writing, as a user's pool is: one seconds old would be hashed again by the stage (the digest cache
  does not trust an mtime that fresh).
- peak RSS of the `run` that pseudo-labels the larger pool against the smaller one's, per format.
  Target <= 1.2x.
- with --ranks 2 (the default), for the first format at the smallest size: the pseudolabel stage again
  under `python -m pipeline.torchrun --nproc-per-node=2`, each rank's peak RSS sampled from /proc. Target:
  the ranks' sum, less the second copy of the model, <= 1.3x one process's. Also printed: the same sum
  above an idle interpreter that has imported what the stage imports (each process pays that once).
- mart stage images/s (the best epoch's, from the stage's log) with the pool read from pseudolabels.h5
  (mart.pool_in_memory = 0) against the same stage with the pool loaded in memory, alternated twice
  (--force), the best epoch of each side. Target >= 0.95x. The in-memory side is skipped for a size
  whose pool needs more than half the available RAM.

Free disk is checked before each size (the pool and pseudolabels.h5, a copy of its images: 2.2x the
pool); a size that does not fit is skipped with the reason. Each format's files are deleted before
the next format is written.

Runtime on 2 cores: --quick about 10 minutes (each CLI command pays python + torch start-up); the
default sizes about 3 minutes per layout at 0.5M and 10 minutes per layout at 5M (pseudo-labeling
runs at ~10,000 img/s with tiny-cnn, the runner keeping freed memory), so under an hour for all four;
35 GB free disk for the 5M pools.
Measured figures: README.md, "Benchmarks".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (32, 32, 3)
ROW_BYTES = int(np.prod(SHAPE))
FORMATS = ("npz", "npz-2part", "npy", "hdf5")
FULL_SIZES = (500_000, 5_000_000)
QUICK_SIZES = (2_000, 8_000)
MIB = 1 << 20
_BLOCK = 8192
# Runs the pipeline CLI in this interpreter and writes its peak RSS (VmHWM) when it exits, however it exits.
_CLI_CHILD = """
import atexit, runpy, sys
def _peak(path):
    with open(path, "w") as out:
        out.write([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
atexit.register(_peak, sys.argv[1])
sys.argv = ["pipeline", *sys.argv[2:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


# -- the labeled set the CLI loads (data.dataset = "benchmarks.bench_pool_scale:labeled_set") ------------
def labeled_set(root: str = "") -> dict:
    """512 training and 64 test images of noise, 32x32x3, 10 classes: enough for a teacher to exist."""
    rng = np.random.default_rng(0)
    return {"train_images": rng.integers(0, 256, (512, *SHAPE), dtype=np.uint8),
            "train_labels": rng.integers(0, 10, 512), "test_images": rng.integers(0, 256, (64, *SHAPE), dtype=np.uint8),
            "test_labels": rng.integers(0, 10, 64), "class_names": [f"class{k}" for k in range(10)]}


# -- synthetic pools, written block by block (never whole in memory) ---------------------------------------
def _blocks(start: int, stop: int):
    """(rows, labels) blocks for pool rows [start, stop); row r is a fixed random image r % 8192 shifted by
    r // 8192 (cheap to make, the same rows whatever the parts' boundaries)."""
    source = np.random.default_rng(0).integers(0, 256, (_BLOCK, *SHAPE), dtype=np.uint8)
    first = start
    while first < stop:
        last = min((first // _BLOCK + 1) * _BLOCK, stop)
        rows = source[first % _BLOCK: first % _BLOCK + last - first] + np.uint8((first // _BLOCK) % 256)
        yield rows, (np.arange(first, last) % 10).astype(np.int64)
        first = last


def _write_npy_stream(stream, start: int, stop: int, labels: bool = False) -> None:
    shape = (stop - start,) if labels else (stop - start, *SHAPE)
    np.lib.format.write_array_header_1_0(stream, {"descr": np.dtype(np.int64 if labels else np.uint8).str,
                                                  "fortran_order": False, "shape": shape})
    for rows, row_labels in _blocks(start, stop):
        stream.write((row_labels if labels else rows).tobytes())


def _write_npz(path: Path, start: int, stop: int) -> None:
    """What np.savez(path, image=..., label=...) writes (stored members, zip64), from blocks."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, labels in (("image", False), ("label", True)):
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                _write_npy_stream(member, start, stop, labels)


def _write_hdf5(path: Path, n: int) -> None:
    import h5py

    with h5py.File(path, "w") as h5:
        images = h5.create_dataset("images", (n, *SHAPE), np.uint8, chunks=(1024, *SHAPE))
        labels = h5.create_dataset("labels", (n,), np.int64)
        first = 0
        for rows, row_labels in _blocks(0, n):
            images[first:first + len(rows)], labels[first:first + len(rows)] = rows, row_labels
            first += len(rows)


def write_pool(directory: Path, fmt: str, n: int) -> tuple[str, str]:
    """Write an `n`-image pool in `fmt`; returns (pool.provider, pool.path) for the config."""
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        _write_npz(directory / "pool.npz", 0, n)
        return "npz", str(directory / "pool.npz")
    if fmt == "npz-2part":
        _write_npz(directory / "part-0.npz", 0, n // 2)
        _write_npz(directory / "part-1.npz", n // 2, n)
        return "npz", str(directory / "part-*.npz")
    if fmt == "npy":
        with open(directory / "pool.npy", "wb") as f:
            _write_npy_stream(f, 0, n)
        return "npy", str(directory / "pool.npy")
    if fmt == "hdf5":
        _write_hdf5(directory / "pool.h5", n)
        return "hdf5", str(directory / "pool.h5")
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


# -- the CLI -------------------------------------------------------------------------------------------
def write_config(path: Path, provider: str, pool_path: str, arch: str, pool_batch: int, mart_epochs: int,
                 mart_epoch_size: int) -> Path:
    path.write_text(f"""# bench_pool_scale: a synthetic labeled set, a file pool, small fast stages
[run]
device = "cpu"
[data]
dataset = "benchmarks.bench_pool_scale:labeled_set"
num_labeled = 0
[pool]
provider = "{provider}"
path = "{pool_path}"
[teacher]
arch = "{arch}"
epochs = 1
batch_size = 128
[pseudolabel]
batch_size = {pool_batch}
[mart]
arch = "{arch}"
epochs = {mart_epochs}
epoch_size = {mart_epoch_size}
batch_size = {min(128, mart_epoch_size)}
steps = 2
augment = false
eval_n = 64
""")
    return path


def _child_env(scratch: Path) -> dict:
    """The environment of every child: this checkout importable; the digest cache and the stage store in
    the scratch dir, so the temporary pools' digests and entries do not go into the user's."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "RST_MART_CACHE_DIR": str(scratch / "digest-cache"), "RST_MART_STORE": str(scratch / "store")}


def run_cli(args: list[str], scratch: Path) -> dict:
    """`python -m pipeline *args` in a fresh interpreter: its output, wall seconds and peak RSS (MiB)."""
    peak_file = scratch / f"peak-{time.monotonic_ns()}"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CLI_CHILD, str(peak_file), *args], cwd=ROOT, env=_child_env(scratch),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"python -m pipeline {' '.join(args)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak_mib = int(peak_file.read_text()) / 1024
    peak_file.unlink()
    return {"seconds": seconds, "peak_mib": peak_mib, "output": proc.stdout + proc.stderr}


def _rank_peaks_mib(root: int, peaks: dict[int, float]) -> None:
    """Fold the current VmHWM of every rank below `root` (processes running `-m pipeline`, not the
    launchers) into `peaks` (pid -> MiB). VmHWM only grows, so the last sample before a rank exits
    is its peak up to the sampling interval."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # the process exited while we looked
            continue
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if b"pipeline" in argv and b"-m" in argv and b"torch.distributed.run" not in argv:
            hwm = [line for line in status.splitlines() if line.startswith("VmHWM")]
            if hwm:
                peaks[pid] = max(peaks.get(pid, 0.0), int(hwm[0].split()[1]) / 1024)


def run_ranks(args: list[str], scratch: Path, ranks: int) -> dict:
    """`python -m pipeline.torchrun --standalone --nproc-per-node=ranks *args`: its output, wall seconds
    and each rank's peak RSS (MiB), sampled from /proc every 0.1 s while it runs."""
    log, peaks = scratch / f"ranks-{time.monotonic_ns()}.log", {}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.torchrun", "--standalone", f"--nproc-per-node={ranks}",
                                 *args], cwd=ROOT, env=_child_env(scratch), stdout=out, stderr=subprocess.STDOUT)
        while True:
            _rank_peaks_mib(proc.pid, peaks)
            try:
                proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                continue
    seconds, output = time.perf_counter() - started, log.read_text()
    log.unlink()
    if proc.returncode or len(peaks) != ranks:
        raise RuntimeError(f"python -m pipeline.torchrun {' '.join(args)}: exit {proc.returncode}, "
                           f"{len(peaks)} of {ranks} ranks seen:\n{output[-3000:]}")
    return {"seconds": seconds, "peak_mib": sorted(peaks.values()), "output": output}


def interpreter_baseline_mib(scratch: Path) -> float:
    """Peak RSS of a python that has imported what the pseudolabel stage imports and done nothing:
    what every process pays before it touches data (torch's own import is most of it)."""
    peak_file = scratch / f"baseline-{time.monotonic_ns()}"
    code = ("import sys, torch, h5py, pandas, ml.labeling, pipeline.cli\n"
            "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0]\n"
            "open(sys.argv[1], 'w').write(hwm.split()[1])")
    subprocess.run([sys.executable, "-c", code, str(peak_file)], cwd=ROOT, check=True, env=_child_env(scratch))
    peak = int(peak_file.read_text()) / 1024
    peak_file.unlink()
    return peak


def _best_epoch_images_per_s(output: str) -> float:
    rates = [float(m) for m in re.findall(r"epoch \d+/\d+: .*?([\d.]+) img/s", output)]
    if not rates:
        raise RuntimeError(f"no epoch img/s line in the mart stage's output:\n{output[-2000:]}")
    return max(rates)


def bare_forward_images_per_s(model_path: Path, pool_images: np.ndarray, batch_size: int) -> float:
    """The stage's arithmetic without its I/O: the teacher over uint8 images already in memory, converted
    and scored as the stage does (ml.evaluation.to_tensor_images, softmax, max), one sustained pass
    after a warm-up batch, images per second over the whole pass. (A best-of-rounds over short passes
    is not comparable with a stage's sustained rate: rounds of 20,000 images ranged 3,000-3,900 img/s
    on an idle 2-core machine, and the best of 6 ran 15-25% above a sustained pass.)"""
    import torch

    from ml.checkpoints import load_model
    from ml.evaluation import to_tensor_images
    from pipeline.core.host_memory import keep_freed_memory

    keep_freed_memory()  # as the runner does before every stage
    teacher = load_model(model_path, device="cpu")
    with torch.inference_mode():
        teacher(to_tensor_images(pool_images[:batch_size], torch.device("cpu")))  # oneDNN primitives made once
        started = time.perf_counter()
        for first in range(0, len(pool_images), batch_size):
            logits = teacher(to_tensor_images(pool_images[first:first + batch_size], torch.device("cpu"))).float()
            torch.softmax(logits, dim=1).max(dim=1)
        return len(pool_images) / (time.perf_counter() - started)


def _read_first_rows(provider: str, pool_path: str, count: int) -> np.ndarray:
    from data.pools import BUILTIN_PROVIDERS

    return BUILTIN_PROVIDERS[provider](pool_path).read(0, count)


def measure(fmt: str, n: int, tmp: Path, arch: str, pool_batch: int, bare_images: int, mart_epochs: int,
            mart_epoch_size: int, teacher_dir: Path, ranks: int = 0) -> dict:
    """One format at one size: the pool written, the pipeline run through the CLI, the numbers, the files gone.
    `teacher_dir` is a finished teacher stage in the scratch store (its fingerprint does not depend on the
    pool), so the measured `run --stages pseudolabel` pseudo-labels and nothing else. With `ranks` > 1 the
    stage is run again (--force) under torchrun with that many processes, for their peak RSS."""
    pool_dir, workdir, scratch = tmp / f"pool-{fmt}-{n}", tmp / f"work-{fmt}-{n}", tmp / "scratch"
    scratch.mkdir(exist_ok=True)
    try:
        started = time.perf_counter()
        provider, pool_path = write_pool(pool_dir, fmt, n)
        written_s = time.perf_counter() - started
        # A user's pool was written long before its run. One seconds old is too fresh for the digest cache
        # to trust (pipeline.core.fingerprint.RACY_WINDOW_NS), so the stage would hash it a second time.
        an_hour_ago = time.time() - 3600
        for file in pool_dir.iterdir():
            os.utime(file, (an_hour_ago, an_hour_ago))
        config = write_config(tmp / f"{fmt}-{n}.toml", provider, pool_path, arch, pool_batch, mart_epochs,
                              mart_epoch_size)
        common = ["--config", str(config), "--workdir", str(workdir)]
        pseudolabel = run_cli(["run", "--stages", "pseudolabel", *common], scratch)
        if "teacher: cached" not in pseudolabel["output"]:
            raise RuntimeError(f"the stored teacher was not reused:\n{pseudolabel['output'][-3000:]}")
        pseudolabel_s = json.loads((workdir / "pseudolabel" / "stage.json").read_text())["seconds"]
        bare = bare_forward_images_per_s(workdir / "teacher" / "model.pt",
                                         _read_first_rows(provider, pool_path, min(n, bare_images)), pool_batch)
        row = {}
        if ranks > 1:
            spread = run_ranks(["run", "--stages", "pseudolabel", "--force", *common], scratch, ranks)
            row = {"ranks": ranks, "ranks_peak_mib": spread["peak_mib"],
                   "model_mib": (workdir / "teacher" / "model.pt").stat().st_size / MIB}
        # Alternated twice (h5, memory, h5, memory): a few-second epoch's rate swings by several percent.
        sides = {"h5": "0"}
        if n * ROW_BYTES <= _available_ram_bytes() / 2:
            sides["memory"] = str(math.ceil(n * ROW_BYTES / 2**30) + 1)
        mart = {side: 0.0 for side in sides}
        for _ in range(2):
            for side, gib in sides.items():
                out = run_cli(["run", "--stages", "mart", "--force", *common, "--set", f"mart.pool_in_memory={gib}"],
                              scratch)
                mart[side] = max(mart[side], _best_epoch_images_per_s(out["output"]))
        run_cli(["status", "--stages", "mart", *common], scratch)  # warm-up: digests cached, page cache
        status = run_cli(["status", "--stages", "mart", *common], scratch)
        if "missing" in status["output"] or "stale" in status["output"]:
            raise RuntimeError(f"status after a full run is not all fresh:\n{status['output']}")
        return {**row, "format": fmt, "images": n, "pool_mib": n * ROW_BYTES / MIB, "write_s": written_s,
                "status_s": status["seconds"], "status_peak_mib": status["peak_mib"],
                "pseudolabel_images_per_s": n / pseudolabel_s, "bare_images_per_s": bare,
                "pseudolabel_peak_mib": pseudolabel["peak_mib"],
                "mart_h5_images_per_s": mart["h5"], "mart_memory_images_per_s": mart.get("memory")}
    finally:
        shutil.rmtree(pool_dir, ignore_errors=True)
        for stage in ("pseudolabel", "mart"):  # their store entries hold a copy of the pool's size
            if (workdir / stage).is_symlink():
                shutil.rmtree((workdir / stage).resolve(), ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def train_teacher(tmp: Path, arch: str, pool_batch: int, mart_epochs: int, mart_epoch_size: int) -> Path:
    """The teacher stage once, for every format and size: its directory."""
    (tmp / "scratch").mkdir(exist_ok=True)
    config = write_config(tmp / "teacher.toml", "npy", "", arch, pool_batch, mart_epochs, mart_epoch_size)
    run_cli(["run", "--stages", "teacher", "--config", str(config), "--workdir", str(tmp / "work-teacher")],
            tmp / "scratch")
    return tmp / "work-teacher" / "teacher"


def _available_ram_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def bench_pool_scale(sizes=QUICK_SIZES, formats=FORMATS, arch: str = "tiny-cnn", pool_batch: int = 1024,
                     bare_images: int = 100_000, mart_epochs: int = 3, mart_epoch_size: int = 2048,
                     tmp_dir: str | None = None, ranks: int = 2) -> dict:
    """Rows per (format, size) and the sizes skipped for want of disk, with why. The mart stage's best
    epoch of `mart_epochs` x `mart_epoch_size` examples gives its images/s. For the first format at the
    smallest size the pseudolabel stage also runs under torchrun with `ranks` processes (0 or 1: not)."""
    result = {"rows": [], "skipped": {}, "arch": arch}
    with tempfile.TemporaryDirectory(prefix="bench-pool-scale-", dir=tmp_dir) as tmp:
        tmp = Path(tmp)
        teacher_dir = train_teacher(tmp, arch, pool_batch, mart_epochs, mart_epoch_size)
        if ranks > 1:
            result["baseline_mib"] = interpreter_baseline_mib(tmp / "scratch")
        for n in sizes:
            needed, free = int(2.2 * n * ROW_BYTES) + (1 << 30), shutil.disk_usage(tmp).free
            if free < needed:
                result["skipped"][n] = (f"needs {needed / 2**30:.1f} GiB free in {tmp} (the pool and pseudolabels.h5), "
                                        f"has {free / 2**30:.1f} GiB")
                print(f"pool_scale: skipping {n} images: {result['skipped'][n]}", flush=True)
                continue
            for fmt in formats:
                row = measure(fmt, n, tmp, arch, pool_batch, bare_images, mart_epochs, mart_epoch_size, teacher_dir,
                              ranks=ranks if (n, fmt) == (min(sizes), formats[0]) else 0)
                result["rows"].append(row)
                print(f"pool_scale: {fmt} {n}: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                                              for k, v in row.items()}), flush=True)
    return result


def comparisons(result: dict) -> list:
    from benchmarks.common import Comparison

    rows, out = result["rows"], []
    for row in rows:
        what, note = f"{row['format']} {row['images']:,}", f"pool {row['pool_mib']:.0f} MiB, {result['arch']}"
        out += [Comparison("pool_scale", f"status seconds, {what}", "status", row["status_s"], "2 s", 2.0, "s",
                           "<=", 1.0, note=note, extra=row),
                Comparison("pool_scale", f"status peak RSS, {what}", "status", row["status_peak_mib"], "400 MiB", 400.0,
                           "MiB", "<=", 1.0, note=note, extra=row),
                Comparison("pool_scale", f"pseudolabel vs bare forward, {what}", "stage",
                           row["pseudolabel_images_per_s"], "bare", row["bare_images_per_s"], "img/s", ">=", 0.9,
                           note=note, extra=row)]
        if row.get("ranks_peak_mib"):
            ranks, summed = row["ranks"], sum(row["ranks_peak_mib"])
            out.append(Comparison("pool_scale", f"pseudolabel peak RSS, {ranks} ranks summed less a model copy vs "
                                  f"1 process, {what}", f"{ranks} ranks", summed - (ranks - 1) * row["model_mib"],
                                  "1 process", row["pseudolabel_peak_mib"], "MiB", "<=", 1.3,
                                  note=f"ranks {', '.join(f'{p:.0f}' for p in row['ranks_peak_mib'])} MiB; "
                                       f"model {row['model_mib']:.2f} MiB", extra=row))
            if result.get("baseline_mib"):
                base = result["baseline_mib"]
                out.append(Comparison("pool_scale", f"pseudolabel peak RSS above an idle interpreter, {ranks} ranks "
                                      f"summed vs 1 process, {what}", f"{ranks} ranks", summed - ranks * base,
                                      "1 process", row["pseudolabel_peak_mib"] - base, "MiB", "<=", None,
                                      note=f"interpreter with the stage's imports: {base:.0f} MiB per process",
                                      extra=row))
        if row["mart_memory_images_per_s"]:
            out.append(Comparison("pool_scale", f"mart pool from h5 vs in memory, {what}", "h5",
                                  row["mart_h5_images_per_s"], "memory", row["mart_memory_images_per_s"], "img/s",
                                  ">=", 0.95, note=note, extra=row))
    for fmt in dict.fromkeys(row["format"] for row in rows):
        sized = sorted((row for row in rows if row["format"] == fmt), key=lambda row: row["images"])
        if len(sized) >= 2:
            small, large = sized[0], sized[-1]
            name = f"pseudolabel peak RSS {large['images']:,} vs {small['images']:,}, {fmt}"
            out.append(Comparison("pool_scale", name, "large", large["pseudolabel_peak_mib"], "small",
                                  small["pseudolabel_peak_mib"], "MiB", "<=", 1.2,
                                  note=f"pools {small['pool_mib']:.0f} and {large['pool_mib']:.0f} MiB"))
    return out


def run(quick: bool = False, tmp_dir: str | None = None, sizes=None, formats=FORMATS, ranks: int = 2) -> list:
    from benchmarks.common import print_comparisons, print_header

    print_header("pool_scale: status, pseudolabel and mart through the CLI, per pool format and size")
    if quick:
        result = bench_pool_scale(sizes or QUICK_SIZES, formats, mart_epochs=2, mart_epoch_size=512, tmp_dir=tmp_dir,
                                  ranks=ranks)
    else:
        result = bench_pool_scale(sizes or FULL_SIZES, formats, tmp_dir=tmp_dir, ranks=ranks)
    for n, why in result["skipped"].items():
        print(f"pool_scale: {n:,} images skipped: {why}")
    return print_comparisons(comparisons(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"pools of {QUICK_SIZES[0]:,} and {QUICK_SIZES[1]:,} images")
    parser.add_argument("--tmp-dir", default=None,
                        help="where the pools and work dirs go (default: the system's temp dir)")
    parser.add_argument("--sizes", default="", help="comma-separated pool sizes instead of the defaults, e.g. 5000000")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"a subset of {','.join(FORMATS)}")
    parser.add_argument("--ranks", type=int, default=2,
                        help="for the first format at the smallest size, also run pseudolabel under torchrun with "
                             "this many processes for their summed peak RSS (0: skip)")
    args = parser.parse_args()
    formats = tuple(f for f in args.formats.split(",") if f)
    if not set(formats) <= set(FORMATS):
        parser.error(f"--formats takes {', '.join(FORMATS)}")
    run(quick=args.quick, tmp_dir=args.tmp_dir, sizes=tuple(int(n) for n in args.sizes.split(",") if n) or None,
        formats=formats, ranks=args.ranks)
