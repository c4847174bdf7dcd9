"""bench_pool_scale end to end through the CLI at a tiny size: positive numbers, one line per target, pools deleted."""
import math

import numpy as np

from benchmarks import bench_pool_scale
from data.pools import BUILTIN_PROVIDERS


def test_pool_scale_tiny(tmp_path):
    """One size only: each size costs five CLI commands and a 2-rank torchrun (about 8 s each on 2 shared cores,
    mostly importing torch)."""
    result = bench_pool_scale.bench_pool_scale(sizes=(300,), formats=("npz-2part",), pool_batch=128,
                                               bare_images=300, mart_epochs=1, mart_epoch_size=64,
                                               tmp_dir=str(tmp_path), ranks=2)
    assert result["skipped"] == {} and [row["images"] for row in result["rows"]] == [300]
    row = result["rows"][0]
    for key in ("status_s", "status_peak_mib", "pseudolabel_images_per_s", "bare_images_per_s",
                "pseudolabel_peak_mib", "mart_h5_images_per_s", "mart_memory_images_per_s"):
        assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
    # Each rank's peak is sampled; each holds at least the interpreter and its imports.
    assert len(row["ranks_peak_mib"]) == 2 and min(row["ranks_peak_mib"]) >= result["baseline_mib"] > 0
    assert len(bench_pool_scale.comparisons(result)) == 4 + 2
    assert not list(tmp_path.rglob("*.npz")) and not list(tmp_path.rglob("*.h5"))


def test_peak_rss_is_compared_across_sizes_per_format():
    rows = [{"format": fmt, "images": n, "pool_mib": n / 350, "status_s": 1.0, "status_peak_mib": 300.0,
             "pseudolabel_images_per_s": 10.0, "bare_images_per_s": 10.0, "pseudolabel_peak_mib": peak,
             "mart_h5_images_per_s": 5.0, "mart_memory_images_per_s": None}
            for fmt, n, peak in [("npy", 500, 100.0), ("npy", 5000, 130.0), ("hdf5", 500, 100.0)]]
    lines = bench_pool_scale.comparisons({"rows": rows, "skipped": {}, "arch": "tiny-cnn"})
    assert len(lines) == 3 * 3 + 1  # no mart line without the in-memory side; one RSS line, for npy
    assert lines[-1].name == "pseudolabel peak RSS 5,000 vs 500, npy" and lines[-1].met is False


def test_writers_give_the_same_rows_in_every_format(tmp_path):
    rows = {}
    for fmt in bench_pool_scale.FORMATS:
        provider, path = bench_pool_scale.write_pool(tmp_path / fmt, fmt, 9000)  # parts split mid-block
        pool = BUILTIN_PROVIDERS[provider](path)
        assert len(pool) == 9000
        rows[fmt] = pool.read(4490, 8200)
        if fmt != "npy":  # the npy pool has no labels file
            np.testing.assert_array_equal(pool.provided_labels()[4490:8200], np.arange(4490, 8200) % 10)
    for fmt in bench_pool_scale.FORMATS[1:]:
        np.testing.assert_array_equal(rows[fmt], rows["npz"])


def test_skips_a_size_without_the_disk_for_it(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_pool_scale.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 << 30})())
    result = bench_pool_scale.bench_pool_scale(sizes=(5_000_000,), tmp_dir=str(tmp_path), ranks=0)
    assert result["rows"] == [] and "needs 32.5 GiB free" in result["skipped"][5_000_000]
