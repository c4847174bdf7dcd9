"""`sweep --launcher slurm` against a real scheduler (scripts/slurm_local.sh sets up a one-node cluster).

One 2 x 2 sweep: the shared stages as one job, the variants as an array after it; one variant killed with
scancel shows up in `sweep --status` with its log, and the rerun submits only that one. One long variant
interrupted by the preemption signal is checkpointed and requeued by submitit and resumes. Every model
equals the serial sweep's.
"""
import json
import shutil
import subprocess
import time
from pathlib import Path

from pipeline.config import load_config
from pipeline.launchers.slurm import master_port
from pipeline.runner import Runner
from tests.conftest import SMOKE
from tests.launch.conftest import GRID, LONG, THREADS, TINY, model_digest, sweep

SLURM = ["--launcher", "slurm", "--cpus", str(THREADS)]


def _jobs(out) -> dict:
    return json.loads((out / "launch.json").read_text())["jobs"]


def _until(condition, what: str, timeout: float = 120):
    """Poll `condition` (a scheduler or file state this process cannot be told about) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def test_a_2x2_sweep_through_slurm_survives_scancel_and_matches_the_serial_sweep(tmp_path, slurm, serial):
    _, reference = serial
    out = tmp_path / "sweep"
    first = sweep("--workdir", out, *GRID, *SLURM, "--no-wait")
    jobs = _jobs(out)
    shared = [j for j in jobs.values() if j["kind"] == "shared"]
    variants = {n: j for n, j in jobs.items() if j["kind"] == "variant"}
    assert len(shared) == 1 and len(variants) == 4, first.stdout
    (array,) = {j["job_id"].split("_")[0] for j in variants.values()}  # one array, after the shared job
    script = (out / "slurm" / f"{array}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{shared[0]['job_id']}" in script and "#SBATCH --array=0-3" in script
    victim, victim_job = next(iter(variants.items()))
    _until(lambda: _state(victim_job["job_id"]) == "RUNNING", f"job {victim_job['job_id']} to start")
    subprocess.run(["scancel", victim_job["job_id"]], check=True)
    _until(lambda: _state(victim_job["job_id"]) == "CANCELLED", "the cancelled state")

    status = sweep("--workdir", out, *GRID, "--status", check=False)
    assert status.returncode == 1, status.stdout
    line = next(row for row in status.stdout.splitlines() if row.startswith(f"{victim}:"))
    assert "CANCELLED" in line and "mart missing" in line
    assert f"{victim} FAILED: job {victim_job['job_id']} CANCELLED" in status.stdout
    assert str(out / "slurm") in status.stdout

    # The rerun waits for what is queued and resubmits only the cancelled variant.
    rerun = sweep("--workdir", out, *GRID, *SLURM)
    assert rerun.stdout.count("submitted as job") == 1 and f"{victim}: submitted as job" in rerun.stdout
    assert len(list((out).glob("*/mart"))) == 4
    for name in variants:
        assert model_digest(out / name) == reference[name], name
    logs = "".join(p.read_text() for p in (out / "slurm").glob("*_log.out"))
    assert logs.count("teacher: ran in") == 1 and logs.count("pseudolabel: ran in") == 1
    done = sweep("--workdir", out, *GRID, "--status")
    assert done.stdout.count(": done; job: COMPLETED") == 4


def test_a_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path, slurm, serial):
    serial_store, reference = serial
    store = tmp_path / "store"
    for stage in ("teacher", "pseudolabel"):  # only MART is trained here
        shutil.copytree(serial_store / stage, store / stage)
    out = tmp_path / "sweep"
    args = ["--workdir", out, "--set", f"run.store={store}", *LONG]
    sweep(*args, *SLURM, "--no-wait")
    (job,) = _jobs(out).values()
    config = load_config(SMOKE, [a for a in TINY + LONG if a != "--set"] + [f"run.store={store}"])
    mart = Runner(config, out / "base").plan(["mart"])[-1]
    state_file = store / "mart" / f"{mart.fingerprint}.partial" / "train_state.pt"
    _until(state_file.exists, f"a checkpoint in {state_file.parent}")
    # What SLURM sends before a time-out or a preemption; submitit checkpoints and requeues the job.
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)
    finished = sweep(*args, *SLURM)
    assert "not submitted again" in finished.stdout
    log = (out / "slurm" / f"{job['job_id']}_0_log.out").read_text()
    assert "Requeued job" in log and "Calling checkpoint method" in log, log
    assert "resumed from checkpoint at epoch 1" in log, log
    assert log.count("mart: missing, running") == 2
    assert model_digest(out / "base") == reference["long"]


def test_one_variant_over_two_tasks_trains_as_under_torchrun(tmp_path, slurm, serial):
    """nodes x tasks_per_node processes for one variant: submitit's rendezvous (MASTER_ADDR/PORT, RANK,
    WORLD_SIZE, LOCAL_RANK from SLURM's variables) starts the same process group torchrun would."""
    serial_store, _ = serial
    store = tmp_path / "store"
    for stage in ("teacher", "pseudolabel"):
        shutil.copytree(serial_store / stage, store / stage)
    out = tmp_path / "sweep"
    proc = sweep("--workdir", out, "--set", f"run.store={store}", "--set", "mart.beta=2", "--launcher", "slurm",
                 "--tasks-per-node", "2", "--cpus", "1")
    (job,) = _jobs(out).values()
    rank0 = (out / "slurm" / f"{job['job_id']}_0_log.out").read_text()
    rank1 = (out / "slurm" / f"{job['job_id']}_1_log.out").read_text()
    assert "global_rank=0(2)" in rank0 and "global_rank=1(2)" in rank1
    # One task that fails ends the other instead of leaving it waiting for its rank 0.
    assert "--kill-on-bad-exit=1" in (out / "slurm" / f"{job['job_id']}_submission.sh").read_text()
    assert "mart: ran in" in rank0 and "mart: ran in" not in rank1  # only rank 0 reports, as under torchrun
    assert "mart: ran in" in proc.stdout and (out / "base" / "mart" / "model.pt").exists()


def test_the_rendezvous_port_is_outside_the_ephemeral_range_and_the_same_for_every_task():
    low, _high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = {master_port(str(job_id)) for job_id in range(1, 50_000, 7)}
    assert max(ports) < low and min(ports) >= 1024 and len(ports) > 1000
    assert master_port("4711") == master_port("4711")
