"""What every benchmark shares: interleaved timing, the comparison record and its table line, the
machine description, and synthetic data (images, a labeled set, a saved teacher, an .npy pool).

Timing rule: the two sides of a comparison run in alternating rounds in one process (A, B, A, B, ...)
and each side keeps its best round (or, for training loops, the median step over all rounds), so a
burst of load from another process hurts one round of each side rather than one side; ratios are
what the targets are about.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch


# -- comparisons -----------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One table line: `measured` (the pipeline's code path) against `reference` (a bare baseline)."""

    benchmark: str        # the script, e.g. "pseudolabel"
    name: str             # what is compared, e.g. "stage streaming vs bare forward"
    measured_label: str
    measured: float
    reference_label: str
    reference: float
    unit: str             # "img/s", "MiB", ...
    target_op: str        # ">=" or "<=": how ratio must compare with target
    target: float | None  # None: informational, no verdict
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.measured / self.reference if self.reference else float("nan")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.target_op == ">=" else self.ratio <= self.target

    def line(self) -> str:
        target = "(no target)" if self.target is None else f"(target {self.target_op} {self.target:g})"
        verdict = {None: "", True: "ok", False: "MISSED"}[self.met]
        return (f"{self.benchmark:<11} {self.name:<48} {self.measured:>9.1f} / {self.reference:>9.1f} {self.unit:<5}"
                f" = {self.ratio:6.2f}x  {target:<15} {verdict:<6}" + (f" [{self.note}]" if self.note else ""))

    def row(self) -> dict:
        row = asdict(self)
        row.pop("extra")
        row.update(ratio=self.ratio, met=self.met, extra=json.dumps(self.extra, sort_keys=True))
        return row


@contextlib.contextmanager
def quiet_stderr():
    """Swallow what a stage writes to stderr (its tqdm bar, which ignores TQDM_DISABLE when the stage
    passes `disable=` itself); exceptions still propagate."""
    saved, sys.stderr = sys.stderr, io.StringIO()
    try:
        yield
    finally:
        sys.stderr = saved


def print_comparisons(rows: list) -> list:
    """Print each comparison's line as it is measured; return the rows for the summary."""
    for c in rows:
        print(c.line(), flush=True)
    return rows


def print_header(title: str) -> None:
    print(f"\n== {title}", flush=True)


# -- timing ----------------------------------------------------------------------------------------
def best_rates(passes: dict[str, Callable[[], int]], rounds: int) -> dict[str, float]:
    """Items per second of each pass (a callable returning how many items it processed), best of
    `rounds` interleaved rounds."""
    best: dict[str, float] = {name: 0.0 for name in passes}
    for _ in range(rounds):
        for name, run_pass in passes.items():
            start = time.perf_counter()
            items = run_pass()
            seconds = time.perf_counter() - start
            best[name] = max(best[name], items / max(seconds, 1e-9))
    return best


def timed_iter(items, record: list[float]):
    """Yield from `items`, appending to `record` the seconds from each request to the next: for a
    training loop consuming batches that is one step (the wait for its batch + its compute)."""
    start = time.perf_counter()
    for item in items:
        yield item
        now = time.perf_counter()
        record.append(now - start)
        start = now


def median_step_rates(passes: dict[str, Callable[[list], None]], rounds: int, items_per_step: int) -> dict[str, float]:
    """Items per second from the median step time of each pass (a callable that appends each step's
    seconds to the list it gets), over `rounds` interleaved rounds. The median of many steps resists
    both a slow step (another process's burst) and a lucky one better than one pass's total."""
    steps: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, run_pass in passes.items():
            run_pass(steps[name])
    return {name: items_per_step / float(np.median(seconds)) for name, seconds in steps.items()}


# -- the machine -----------------------------------------------------------------------------------
def machine() -> str:
    """CPU model, cores, torch threads and the 1-minute load average (other processes skew timings)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
            f"{gpu}, load average {load:.2f} at start")


# -- synthetic data --------------------------------------------------------------------------------
def synthetic_images(n: int, shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """uint8 (n, H, W, C) noise; content does not change any timing measured here."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def synthetic_labeled_set(shape: tuple[int, int, int], num_train: int = 512, num_test: int = 64,
                          num_classes: int = 10, seed: int = 0):
    from data.labeled import LabeledSet

    rng = np.random.default_rng(seed)
    return LabeledSet(
        name="bench-synthetic",
        train_images=synthetic_images(num_train, shape, seed),
        train_labels=rng.integers(0, num_classes, num_train).astype(np.int64),
        test_images=synthetic_images(num_test, shape, seed + 1),
        test_labels=rng.integers(0, num_classes, num_test).astype(np.int64),
        class_names=tuple(f"class{k}" for k in range(num_classes)))


def save_teacher(directory: Path, arch: str, shape: tuple[int, int, int], num_classes: int = 10,
                 seed: int = 0) -> Path:
    """A freshly initialised teacher saved as the teacher stage would (model.pt + stage.json)."""
    from ml.checkpoints import save_model
    from ml.models import build_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    channels = shape[2]
    model = build_model(arch, num_classes=num_classes, in_channels=channels)
    save_model(directory / "model.pt", model, arch=arch, num_classes=num_classes, in_channels=channels,
               mean=[0.5] * channels, std=[0.25] * channels)
    (directory / "stage.json").write_text(json.dumps({"stage": "teacher", "fingerprint": f"bench-{arch}"}))
    return directory


def write_npy_pool(path: Path, n: int, shape: tuple[int, int, int], block: int = 8192, seed: int = 0) -> Path:
    """An (n, H, W, C) uint8 .npy written block by block through a memmap, so a 1.5 GB pool never sits
    in this process's memory. Blocks repeat one random block with a per-block offset (cheap to make)."""
    source = synthetic_images(min(block, n), shape, seed)
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *shape))
    for i, start in enumerate(range(0, n, block)):
        stop = min(start + block, n)
        np.add(source[:stop - start], np.uint8(i % 256), out=images[start:stop], casting="unsafe")
        images.flush()
    del images
    return Path(path)
