"""bench_generate end to end at a tiny size: positive numbers under the expected keys (no speed thresholds)."""
import math

from benchmarks import bench_generate, run_all


def test_generate_benchmark_runs(tmp_path):
    throughput = bench_generate.bench_throughput(n=16, steps=2, batch_size=8, rounds=1, tmp_dir=str(tmp_path))
    memory = bench_generate.bench_memory(small=32, large=64, tmp_dir=str(tmp_path))
    for value in [*throughput.values(), *memory.values()]:
        assert math.isfinite(value) and value > 0
    rows = bench_generate.comparisons(throughput, memory)
    assert [(r.unit, r.target_op, r.target) for r in rows] == [("img/s", ">=", 0.95), ("MiB", "<=", 1.1)]
    assert memory["large_peak_mib"] > 100  # a real process's peak (torch alone is hundreds of MiB)
    assert "generate" in run_all.BENCHMARKS
