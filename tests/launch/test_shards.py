"""Sharded stages (Stage.shards, StageContext.shard): `run --launcher local|slurm --jobs N` has N real jobs make
the shards, then commits the stage once, byte for byte the serial run's entry; a failed job stops the run
with exit 2 naming its log and keeps the shards made for the rerun; torchrun's ranks and `run --shard I/N`
by hand make them the same way. The stages are tests/launch/sharded_plugin.py's, installed as a plug-in."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from pipeline.config import LauncherConfig
from pipeline.launchers import Job, make_launcher
from tests.conftest import ROOT, SMOKE, run_cli
from tests.launch.sharded_plugin import N_BLOCKS, install


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    return install(tmp_path_factory.mktemp("plugin") / "site")


def cli(env, workdir, *args, check=True):
    return run_cli("run", "--config", SMOKE, "--stages", "blocks", "--workdir", workdir,
                   "--set", f"run.store={workdir.parent / 'store'}", *args, env=env, check=check)


def entry(workdir) -> dict[str, bytes]:
    """Every file of the committed blocks entry (stage.json's timings left out), by name."""
    path = (workdir / "blocks").resolve()
    files = {p.name: p.read_bytes() for p in path.iterdir() if p.name != "stage.json"}
    record = json.loads((path / "stage.json").read_text())
    files["stage.json"] = json.dumps({k: record[k] for k in ("fingerprint", "params", "inputs", "outputs")}).encode()
    return files


def made(text: str) -> list[int]:
    """The blocks a process reports making, in order."""
    return [int(b) for b in re.findall(r"made block (\d+)", text)]


@pytest.fixture(scope="module")
def serial(tmp_path_factory, plugin_env):
    """The reference: every block made in the run's own process."""
    workdir = tmp_path_factory.mktemp("serial") / "w"
    out = cli(plugin_env, workdir).stdout
    assert sorted(made(out)) == list(range(N_BLOCKS)) and "blocks: ran in" in out
    return entry(workdir)


def test_three_local_jobs_make_the_shards_and_the_run_commits_the_serial_entry(tmp_path, plugin_env, serial):
    workdir = tmp_path / "w"
    out = cli(plugin_env, workdir, "--launcher", "local", "--jobs", "3").stdout
    assert "blocks: 6 shards, made by 3 local job(s)" in out and "blocks: ran in" in out, out
    assert made(out) == []  # the run itself made none: the jobs made them all
    for i in range(3):
        log = (workdir / "logs" / f"blocks-shard-{i}-of-3.log").read_text()
        assert made(log) == [i, i + 3] and f"blocks: made shards {i}/3" in log, log
    assert entry(workdir) == serial

    again = cli(plugin_env, workdir, "--launcher", "local", "--jobs", "3").stdout
    assert "blocks: cached" in again and "made by" not in again


def test_a_failed_job_exits_2_naming_its_log_and_the_rerun_makes_only_the_missing_shards(tmp_path, plugin_env, serial):
    workdir = tmp_path / "w"
    failing = cli(plugin_env, workdir, "--launcher", "local", "--jobs", "3", "--set", "blocks.fail_block=4",
                  check=False)
    paragraph = " ".join(failing.stderr.split())
    assert failing.returncode == 2 and "Traceback" not in failing.stderr, failing.stderr
    assert "1 of the 3 jobs making the shards of stage blocks did not succeed" in paragraph
    assert str(workdir / "logs" / "blocks-shard-1-of-3.log") in paragraph and "asked to fail at block 4" in paragraph
    assert "Nothing was committed" in paragraph
    (partial,) = (tmp_path / "store" / "blocks").glob("*.partial")
    assert sorted(p.name for p in partial.iterdir()) == [f"block-{s}.bin" for s in (0, 1, 2, 3, 5)]
    assert not os.path.lexists(workdir / "blocks")
    assert [p.name for p in (tmp_path / "store" / "blocks").iterdir() if p.is_dir()] == [partial.name]

    # fail_block does not enter the fingerprint: the rerun finds the five shards and makes block 4 only.
    rerun = cli(plugin_env, workdir, "--launcher", "local", "--jobs", "3")
    logs = "".join((workdir / "logs" / f"blocks-shard-{i}-of-3.log").read_text() for i in range(3))
    assert made(logs) == [4] and made(rerun.stdout) == []
    assert entry(workdir) == serial


def test_shards_made_by_hand_with_run_shard_are_committed_by_a_plain_run(tmp_path, plugin_env, serial):
    """What a user of another scheduler does: `run --shard I/N` anywhere, then one `run` to commit."""
    workdir = tmp_path / "w"
    salt = run_cli("run", "--config", SMOKE, "--stages", "salt", "--workdir", workdir,
                   "--set", f"run.store={tmp_path / 'store'}", env=plugin_env)
    assert "salt: ran in" in salt.stdout
    first = cli(plugin_env, workdir, "--shard", "1/2")
    assert made(first.stdout) == [1, 3, 5] and "blocks: made shards 1/2" in first.stdout
    assert not os.path.lexists(workdir / "blocks")  # nothing committed or linked
    final = cli(plugin_env, workdir)
    assert made(final.stdout) == [0, 2, 4] and "blocks: ran in" in final.stdout
    assert entry(workdir) == serial


@pytest.mark.parametrize("args, fragment", [
    (["--jobs", "2"], "--launcher local"),
    (["--launcher", "local", "--jobs", "0"], "at least 1"),
    (["--shard", "0/2", "--stages", "salt"], "sharded stage"),
    (["--shard", "0/2"], "upstream stage salt is missing"),
    (["--shard", "2/2"], "not I/N"),
])
def test_sharding_mistakes_exit_2_before_anything_is_made(tmp_path, plugin_env, args, fragment):
    proc = cli(plugin_env, tmp_path / "w", *args, check=False)
    assert proc.returncode == 2 and fragment in " ".join(proc.stderr.split()), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "store" / "blocks").exists()


def test_under_torchrun_each_rank_makes_its_own_shards_then_rank_0_commits(tmp_path, plugin_env, serial):
    workdir = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "pipeline", "run",
         "--config", SMOKE, "--stages", "blocks", "--workdir", workdir, "--set", "run.device=cpu",
         "--set", f"run.store={tmp_path / 'store'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, **plugin_env})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    by_pid: dict[str, list[int]] = {}
    for block, pid in re.findall(r"made block (\d+) in pid (\d+)", proc.stdout):
        by_pid.setdefault(pid, []).append(int(block))
    assert sorted(by_pid.values()) == [[0, 2, 4], [1, 3, 5]], proc.stdout  # rank r: the blocks s % 2 == r
    assert proc.stdout.count("blocks: ran in") == 1
    assert entry(workdir) == serial


def test_a_local_launcher_starts_a_dependant_only_after_its_dependency_succeeded(tmp_path):
    """The Launcher interface itself: `after` holds a job back, and a failed dependency means it never starts."""
    launcher = make_launcher("local", LauncherConfig(), folder=tmp_path, jobs=2, run_device="cpu",
                             log=lambda message: None)
    launcher.check()
    good = launcher.submit([Job("good", "shared", ("--help",))])
    bad = launcher.submit([Job("bad", "shared", ("--config", str(tmp_path / "missing.toml")))])
    after_good = launcher.submit([Job("after-good", "variant", ("--help",))], after=good)
    after_bad = launcher.submit([Job("after-bad", "variant", ("--help",))], after=good + bad)
    seen = []
    states = launcher.wait(good + bad + after_good + after_bad, on_change=lambda one, state: seen.append(
        (one.name, state.active)))
    assert states["good"].succeeded and states["after-good"].succeeded and states["after-good"].exit_code == 0
    assert states["bad"].failed and states["bad"].exit_code == 2
    assert not states["after-bad"].started and not states["after-bad"].succeeded
    assert "does not exist" in " ".join((tmp_path / "logs" / "bad.log").read_text().split())
    assert not (tmp_path / "logs" / "after-bad.log").exists()
    assert sorted(name for name, active in seen if not active) == ["after-bad", "after-good", "bad", "good"]


def test_two_slurm_jobs_make_the_shards_a_failure_keeps_them_and_the_rerun_commits_the_serial_entry(
        tmp_path, slurm, plugin_env, serial):
    workdir = tmp_path / "w"
    slurm_args = ("--launcher", "slurm", "--jobs", "2", "--cpus", "1")
    try:
        failing = cli(plugin_env, workdir, *slurm_args, "--set", "blocks.fail_block=3", check=False)
        (first,) = (workdir / "slurm").glob("*_submission.sh")  # one array of two tasks
        out = cli(plugin_env, workdir, *slurm_args).stdout
    finally:  # a failed test leaves nothing queued
        ids = [p.name.split("_")[0] for p in (workdir / "slurm").glob("*_submission.sh")]
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
    array = first.name.split("_")[0]
    paragraph = " ".join(failing.stderr.split())
    assert failing.returncode == 2 and "#SBATCH --array=0-1" in first.read_text(), failing.stderr
    assert f"job {array}_1 FAILED" in paragraph and str(workdir / "slurm" / f"{array}_1_0_log.err") in paragraph
    assert "it says: RuntimeError: asked to fail at block 3" in paragraph, paragraph
    assert "Nothing was committed" in paragraph
    assert made((workdir / "slurm" / f"{array}_0_0_log.out").read_text()) == [0, 2, 4]
    assert made((workdir / "slurm" / f"{array}_1_0_log.out").read_text()) == [1]

    assert "blocks: 6 shards, made by 2 slurm job(s)" in out and "blocks: ran in" in out, out
    (second,) = set((workdir / "slurm").glob("*_submission.sh")) - {first}
    rerun = second.name.split("_")[0]
    logs = [(workdir / "slurm" / f"{rerun}_{i}_0_log.out").read_text() for i in range(2)]
    assert [made(log) for log in logs] == [[], [3, 5]] and made(out) == []
    assert entry(workdir) == serial


def test_a_rerun_after_the_run_was_killed_waits_for_its_slurm_jobs_instead_of_submitting_again(
        tmp_path, slurm, plugin_env, serial):
    """The launching run dies (a login session ends) while its jobs are queued or running: the rerun adopts
    them from <workdir>/launch-blocks.json, waits, and commits the same entry."""
    workdir = tmp_path / "w"
    args = ["--launcher", "slurm", "--jobs", "2", "--cpus", "1", "--set", "blocks.seconds_per_block=5"]
    record = workdir / "launch-blocks.json"
    try:
        first = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "--config", SMOKE, "--stages", "blocks", "--workdir", workdir,
             "--set", f"run.store={tmp_path / 'store'}", *args], cwd=ROOT, env={**os.environ, **plugin_env},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not record.exists():  # written once the jobs are submitted; nothing else can tell this process
            assert first.poll() is None and time.monotonic() < deadline, "the run ended before it submitted"
            time.sleep(0.1)
        first.kill()
        first.wait()
        rerun = cli(plugin_env, workdir, *args).stdout
    finally:
        ids = [job["job_id"] for job in json.loads(record.read_text())["jobs"].values()] if record.exists() else []
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)
    assert rerun.count("not submitted again") == 2 and "submitted as job" not in rerun, rerun
    assert len(list((workdir / "slurm").glob("*_submission.sh"))) == 1 and "blocks: ran in" in rerun
    assert entry(workdir) == serial
