"""Shared pieces of the launcher tests: tiny sweep settings, the serial reference, a real SLURM or a skip."""
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import SMOKE, run_cli

# Seconds per variant: one teacher epoch on 200 images, one MART step. num_workers=0: no prefetch thread.
TINY = ["--set", "teacher.epochs=1", "--set", "data.num_labeled=200", "--set", "pool.limit=128", "--set",
        "mart.epochs=1", "--set", "mart.epoch_size=64", "--set", "mart.eval_n=16", "--set", "run.num_workers=0"]
GRID = ["--set", "mart.beta=1,6", "--set", "mart.unsup_fraction=0.25,0.5"]
# The variant the requeue test interrupts: 30 MART steps, a checkpoint after every one.
LONG = ["--set", "mart.epoch_size=1920", "--set", "run.checkpoint_every_s=0", "--set", "mart.beta=3"]
# The torch threads of one of two jobs sharing this machine; every run compared here uses as many,
# so serial and launched runs do the same floating-point work.
THREADS = max(1, len(os.sched_getaffinity(0)) // 2)


def model_digest(workdir, stage="mart") -> str:
    """sha256 over the tensors of <workdir>/<stage>/model.pt (the file's bytes also hold its temp name)."""
    import torch

    state = torch.load(workdir / stage / "model.pt", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sweep(*args, check=True, timeout=300):
    return run_cli("sweep", "--config", SMOKE, *TINY, *map(str, args), check=check, timeout=timeout,
                   env={"OMP_NUM_THREADS": str(THREADS), "RST_MART_STORE": ""})


@pytest.fixture(scope="session")
def serial(tmp_path_factory):
    """The serial sweep of GRID and a serial run of LONG, on one store: {variant dir name: model digest}."""
    base = tmp_path_factory.mktemp("serial")
    sweep("--workdir", base / "sweep", "--set", f"run.store={base / 'store'}", *GRID)
    run_cli("run", "--config", SMOKE, *TINY, *LONG, "--workdir", base / "sweep" / "long",
            "--set", f"run.store={base / 'store'}", env={"OMP_NUM_THREADS": str(THREADS)})
    digests = {d.name: model_digest(d) for d in (base / "sweep").iterdir() if (d / "mart").is_dir()}
    assert len(digests) == 5
    return base / "store", digests


def slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
    return any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states)


@pytest.fixture
def slurm(tmp_path):
    """A reachable SLURM with an idle node. Skipped without one, except in CI (CI=true), where a missing
    scheduler (or submitit) is a failure: .ci/run sets one up (scripts/slurm_local.sh). Afterwards the
    jobs this test's sweeps submitted (their launch.json files) are cancelled, so a failed test leaves
    nothing queued."""
    in_ci = os.environ.get("CI") == "true"
    if not slurm_up():
        if in_ci:
            pytest.fail("CI=true but no SLURM node is up (sbatch/sinfo); .ci/run should have run "
                        "scripts/slurm_local.sh")
        pytest.skip("no SLURM here (sbatch absent or no node up); as root: bash scripts/slurm_local.sh")
    if importlib.util.find_spec("submitit") is None:
        if in_ci:
            pytest.fail("CI=true but submitit is not installed; scripts/setup.sh installs '.[test,slurm]'")
        pytest.skip("submitit is not installed: pip install 'rst-mart[slurm]'")
    yield
    ids = [job["job_id"] for record in tmp_path.rglob("launch.json")
           for job in json.loads(record.read_text()).get("jobs", {}).values() if "job_id" in job]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)
