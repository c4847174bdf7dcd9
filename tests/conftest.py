import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# One OpenMP thread in the test process and in every process it starts (they inherit the environment): the
# tests' tensors are small, and a 2-rank torchrun or a CLI child beside the parent would otherwise run 4
# threads on a 2-core machine, where a descheduled thread stalls its team at every barrier (the suite took
# 24.5 minutes that way on 2 cores, 13.4 with one thread per process). A user's own setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.toml"


def pytest_collection_modifyitems(items):
    """The launcher tests run in one xdist worker, one after another: they share the one-node SLURM
    cluster (two sweeps at once would queue behind each other's jobs) and the serial reference sweep, a
    session fixture that each worker would otherwise build again."""
    launch = ROOT / "tests" / "launch"
    for item in items:
        if launch in item.path.parents:
            item.add_marker(pytest.mark.xdist_group("launch"))


def run_cli(*args, check=True, timeout=300, env=None):
    """`python -m pipeline ...` in a subprocess, as a user runs it; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def kill_when(args, written: Callable[[], list], timeout: float = 300) -> None:
    """Start `python -m pipeline run ARGS`, SIGKILL it as soon as `written()` finds what it waits for (e.g. a
    training checkpoint in a partial directory): a kill in the middle of the work, on the condition, not a timer."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not written():
            assert proc.poll() is None, "the run ended before what the kill waits for was written"
            assert time.monotonic() < deadline, "nothing was written in time"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


@pytest.fixture(scope="session", autouse=True)
def digest_cache_dir(tmp_path_factory):
    """Digests cached by the tests (and the CLI runs they start) go to a temporary directory, not ~/.cache.

    Session-scoped and autouse so it is in place before other session fixtures (the smoke run) start."""
    from pipeline.core.fingerprint import CACHE_DIR_ENV

    saved = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("digest-cache"))
    yield Path(os.environ[CACHE_DIR_ENV])
    if saved is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = saved


@pytest.fixture(autouse=True)
def own_stage_store(tmp_path, monkeypatch):
    """Each test gets its own stage store, so one test's finished stages never make another's cached."""
    monkeypatch.setenv("RST_MART_STORE", str(tmp_path / "store"))


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """One uninterrupted smoke run shared by the end-to-end tests (treat it as read-only)."""
    base = tmp_path_factory.mktemp("smoke")
    run_cli("run", "--config", SMOKE, "--workdir", base / "w", env={"RST_MART_STORE": str(base / "store")})
    return base / "w"


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A real filesystem of `size` (a tmpfs) mounted at `path` for full-disk tests; yields a function that
    grows it (`grow("16m")`). Skips where mounting needs root or is refused; unmounts afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs; other tests inject ENOSPC instead")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here: {mounted.stderr.decode().strip()}")
    try:
        yield lambda bigger: subprocess.run(["mount", "-o", f"remount,size={bigger}", str(path)], check=True)
    finally:
        subprocess.run(["umount", str(path)], check=True)
