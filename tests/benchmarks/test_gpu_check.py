"""benchmarks.gpu_check's CPU side: its CPU checks pass, its CUDA rows say why they were skipped, and the
table is printed and written as CSV."""
import pandas as pd
import pytest
import torch

from benchmarks import gpu_check

CPU_CHECKS = ["loader-cpu", "fp16-scaler-cpu", "ddp-gloo", "flops"]  # compile-cpu: about a minute of inductor
CUDA_CHECKS = [name for name, (on_cpu, _, _) in gpu_check.CHECKS.items() if not on_cpu]


def test_cpu_checks_pass_and_cuda_checks_say_why_they_were_skipped(tmp_path, capsys):
    out = tmp_path / "table" / "gpu_check.csv"
    table = gpu_check.main(["--quick", "--only", ",".join(CPU_CHECKS + CUDA_CHECKS), "--out", str(out),
                            "--workdir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert f"wrote {out.resolve()}" in printed
    written = pd.read_csv(out)
    assert list(written.columns) == ["check", "status", "detail", "seconds"]
    assert list(written["check"]) == CPU_CHECKS + CUDA_CHECKS
    pd.testing.assert_frame_equal(written, table, check_dtype=False)
    status = dict(zip(written["check"], written["status"]))
    detail = dict(zip(written["check"], written["detail"]))
    for name in CPU_CHECKS:
        assert status[name] == "ok", (name, detail[name])
        assert name in printed
    assert "gloo at world size 1" in detail["ddp-gloo"]
    assert "GFLOP per image" in detail["flops"]
    if torch.cuda.is_available():
        assert not (written["status"] == "FAIL").any(), written.to_string()
    else:
        for name in CUDA_CHECKS:
            assert (status[name], detail[name]) == ("skipped", "no CUDA device"), name
        assert written.set_index("check").loc[CUDA_CHECKS, "seconds"].max() < 1


def test_a_rehearsal_on_the_cpu_runs_the_cuda_checks_plumbing(tmp_path):
    """--device cpu runs the CUDA checks' own code (the CLI runs, the SIGKILL and resume, the WRN timing
    loop) at tiny sizes, so a GPU session does not spend its minutes finding a broken check; what needs
    CUDA itself says so. The compile rows are left out here (inductor takes minutes on 2 cores)."""
    names = ["loader-cuda", "pseudolabel", "mart-fp32", "mart-fp16", "mart-bf16-cl", "resume", "ddp-nccl", "wrn-fp32"]
    table = gpu_check.main(["--device", "cpu", "--quick", "--only", ",".join(names), "--out", str(tmp_path / "t.csv"),
                            "--workdir", str(tmp_path / "work")])
    assert list(table["check"]) == names
    status = dict(zip(table["check"], table["status"]))
    detail = dict(zip(table["check"], table["detail"]))
    for name in ("pseudolabel", "mart-fp32", "mart-bf16-cl", "resume", "wrn-fp32"):
        assert status[name] == "ok", (name, detail[name])
    assert "1.0000 agree with the teacher" in detail["pseudolabel"]
    assert "resumed from checkpoint" in detail["resume"]
    assert "img/s" in detail["wrn-fp32"]
    for name in ("loader-cuda", "mart-fp16", "ddp-nccl"):
        assert status[name] == "skipped" and "CUDA" in detail[name], (name, detail[name])


def test_a_failing_check_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("CUDA error: out of memory\nmore lines")

    monkeypatch.setitem(gpu_check.CHECKS, "loader-cpu", (True, 10, broken))
    table = gpu_check.main(["--only", "loader-cpu,flops", "--out", str(tmp_path / "t.csv")])
    assert list(table["status"]) == ["FAIL", "ok"]
    assert table["detail"][0] == "RuntimeError: CUDA error: out of memory"


def test_a_check_that_would_overrun_the_limit_is_not_started(tmp_path):
    table = gpu_check.main(["--only", "flops", "--limit-s", "1", "--out", str(tmp_path / "t.csv")])
    assert table["status"][0] == "skipped" and "--limit-s 1" in table["detail"][0]


def test_unknown_check_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--only", "no-such-check", "--out", str(tmp_path / "t.csv")])


def test_peaks_by_device_name():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", "fp32") == 495.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe", "fp32") == 378.0
    assert gpu_check.peak_tflops("Some Future GPU", "bf16") is None


def test_mart_flops_count_the_attack_and_the_loss():
    flops = gpu_check.mart_flops_per_image("wrn-28-10", steps=10)
    # One WRN-28-10 forward at 32x32 is 10.5 GFLOP; an attack step adds the input's gradient (one more),
    # the loss two forwards and their backward to inputs and weights (four more).
    assert flops["attack_step"] == pytest.approx(2 * 10.49e9, rel=0.01)
    assert flops["loss"] == pytest.approx(6 * 10.49e9, rel=0.01)
    assert flops["total"] == pytest.approx(10 * flops["attack_step"] + flops["loss"])


def test_the_command_line_and_the_ddp_worker_run_as_modules(tmp_path):
    """`python -m benchmarks.gpu_check` (a package of checks) keeps its flags and its exit status, and the
    worker the NCCL check starts in a subprocess (`--ddp-worker`) runs the same way."""
    import os
    import subprocess
    import sys

    from benchmarks.gpu_check.common import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "t.csv"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--only", "flops", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(pd.read_csv(out)["status"]) == ["ok"] and f"wrote {out.resolve()}" in proc.stdout
    worker = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--ddp-worker", "cpu"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr
    assert "gloo at world size 1" in worker.stdout.strip().splitlines()[-1]

