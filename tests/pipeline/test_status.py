"""`status` is as light as `git status`: no torch, no pool rows, each file hashed once across commands."""
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.core import fingerprint
from pipeline.runner import Runner
from tests.conftest import ROOT, SMOKE


def test_status_imports_no_ml_library(tmp_path):
    code = ("import sys; from pipeline.cli import main; main(['status', '--config', sys.argv[1], '--workdir', "
            "sys.argv[2]]); "
            "print('heavy:', sorted(m for m in ('torch', 'torchvision', 'h5py', 'pandas') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(SMOKE), str(tmp_path / "w")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "teacher: missing" in proc.stdout and "heavy: []" in proc.stdout


@pytest.fixture
def npy_pool(tmp_path):
    path = tmp_path / "pool.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8))
    old = path.stat().st_mtime_ns - 10**10  # older than the digest cache's racy window
    os.utime(path, ns=(old, old))
    return path


def test_planning_reads_no_pool_rows_and_hashes_the_file_once_across_commands(tmp_path, npy_pool, monkeypatch):
    from data import pool_files

    def no_rows(*args, **kwargs):
        raise AssertionError("planning read pool rows")

    for cls in vars(pool_files).values():
        if isinstance(cls, type) and hasattr(cls, "read"):
            monkeypatch.setattr(cls, "read", no_rows)
    hashed = []
    real_hash = fingerprint.hash_file
    monkeypatch.setattr(fingerprint, "hash_file", lambda path, st: hashed.append(path) or real_hash(path, st))
    config = load_config(SMOKE, ["pool.provider=npy", f"pool.path={npy_pool}"])
    for _ in range(2):  # two commands: a fresh process has no in-process memo, only the digest cache
        fingerprint._memo.clear()
        Runner(config, tmp_path / "w").plan(["mart"])
    assert [p for p in hashed if p.name == "pool.npy"] == [npy_pool.resolve()]


def test_an_edited_pool_file_of_the_same_size_makes_pseudolabel_stale(tmp_path, npy_pool):
    config = load_config(SMOKE, ["pool.provider=npy", f"pool.path={npy_pool}"])
    before = Runner(config, tmp_path / "w").plan(["pseudolabel"])[1].fingerprint
    images = np.load(npy_pool)
    images[0, 0, 0, 0] ^= 1
    np.save(npy_pool, images)  # same size, new content and mtime
    fingerprint._memo.clear()
    assert Runner(config, tmp_path / "w").plan(["pseudolabel"])[1].fingerprint != before
