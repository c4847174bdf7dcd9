"""Each benchmark runs end to end at a tiny size and reports positive numbers under the expected keys.

No speed thresholds here: the targets live in the benchmarks' own output (python -m benchmarks.run_all).
"""
import math

import pandas as pd
import pytest
import torch

from benchmarks import bench_loader, bench_mart, bench_memory, bench_pseudolabel, run_all
from benchmarks.common import Comparison


def positive(result: dict, keys) -> None:
    for key in keys:
        assert key in result, f"missing {key}"
        value = result[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key} = {value!r}"


def test_pseudolabel(tmp_path):
    result = bench_pseudolabel.bench_pseudolabel(num_images=300, arch="tiny-cnn", batch_size=128, rounds=1,
                                                 tmp_dir=str(tmp_path))
    positive(result, ["stage_images_per_s", "bare_images_per_s", "bare_channels_last_images_per_s",
                      "ratio", "ratio_channels_last"])
    assert result["rows_written"] == 300
    assert len(bench_pseudolabel.comparisons(result)) == 2


def test_mart():
    result = bench_mart.bench_mart(arch="tiny-cnn", shape=(16, 16, 3), batch_size=8, steps=2, train_steps=1,
                                   rounds=1, num_labeled=32, num_pool=32,
                                   stage_settings=("fp32", "bf16+channels_last"))
    positive(result, ["reference_fp32_images_per_s", "stage_fp32_images_per_s",
                      "stage_bf16+channels_last_images_per_s", "ratio_stage_fp32_vs_reference_fp32",
                      "ratio_stage_bf16+channels_last_vs_reference_fp32"])
    rows = bench_mart.comparisons(result)
    assert [r.target for r in rows] == [1.0, 2.5]
    assert bench_mart.fastest_stage_images_per_s(result) == max(
        result[f"stage_{s}_images_per_s"] for s in ("fp32", "bf16+channels_last"))


def test_mart_reference_loss_is_the_stage_loss():
    from ml.losses import mart_loss

    torch.manual_seed(0)
    natural, adv, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    assert torch.allclose(bench_mart.reference_mart_loss(natural, adv, y), mart_loss(natural, adv, y, beta=6.0))


def test_loader(tmp_path):
    result = bench_loader.bench_loader(num_labeled=64, num_pool=256, batch_size=16, batches=3, rounds=1,
                                       consumer_images_per_s=100.0, tmp_dir=str(tmp_path))
    positive(result, ["in_memory_images_per_s", "hdf5_images_per_s", "mart_images_per_s", "ratio_in_memory",
                      "ratio_hdf5"])
    assert len(bench_loader.comparisons(result)) == 2


def test_memory(tmp_path):
    result = bench_memory.bench_memory(small=200, large=2000, parallel=True, tmp_dir=str(tmp_path))
    positive(result, ["small_peak_rss_mib", "large_peak_rss_mib", "ratio", "small_peak_rss_anon_mib",
                      "large_peak_rss_file_mib", "large_images_per_s"])
    assert len(bench_memory.comparisons(result)) == 2
    assert not list(tmp_path.rglob("*.npy"))  # the pools are deleted


def test_run_all_writes_the_csv(tmp_path, monkeypatch):
    rows = [Comparison("x", "a vs b", "a", 2.0, "b", 1.0, "img/s", ">=", 1.5),
            Comparison("y", "c vs d", "c", 1.0, "d", 1.0, "MiB", "<=", 0.5),
            Comparison("z", "info", "e", 1.0, "f", 4.0, "img/s", ">=", None)]
    monkeypatch.setattr(run_all, "run_all", lambda **kw: rows)
    out = tmp_path / "results.csv"
    assert run_all.main(["--quick", "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert list(frame["ratio"]) == [2.0, 1.0, 0.25]
    assert frame["met"].fillna("").astype(str).tolist() == ["True", "False", ""]
    assert "1 of 2 targets met" in run_all.summary(rows)
    with pytest.raises(SystemExit):
        run_all.main(["--only", "nonsense"])


def test_diffusion_compares_the_stage_loop_with_the_bare_diffusers_loop():
    from benchmarks import bench_diffusion

    rows = bench_diffusion.run(steps=1, rounds=1)
    assert [r.name for r in rows] == ["stage fp32 vs bare diffusers loop",
                                      "stage fp32+channels_last vs bare diffusers loop"]
    assert all(r.measured > 0 and r.reference > 0 and r.target == 1.0 for r in rows)
