"""benchmarks/bench_sweep.py's harness on one tiny variant, serial only (the launched ways are tested in
tests/launch/test_local.py and test_slurm.py, with the same model comparison)."""
from benchmarks import bench_sweep
from tests.launch.conftest import TINY


def test_bench_sweep_times_a_way_and_digests_its_models(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_sweep, "GRID", ["--set", "mart.beta=1"])
    monkeypatch.setattr(bench_sweep, "QUICK", TINY)
    results = bench_sweep.bench_sweep(ways=("serial",), quick=True, tmp_dir=str(tmp_path))
    assert results["serial"]["seconds"] > 0 and list(results["serial"]["models"]) == ["base"]
    text = bench_sweep.table({**results, "slurm": {"skipped": "no sbatch"}})
    assert "1.00x" in text and text.splitlines()[1].endswith("yes / -") and "skipped: no sbatch" in text
    assert list(tmp_path.iterdir()) == []  # its sweeps and stores are removed
