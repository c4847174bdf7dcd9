"""generate -> pseudolabel through the CLI, as a user runs it: pool.provider = "generate" reads the generate
stage's shards, keep_top_fraction keeps the most confident images per class, bad [generate] values and a
model that cannot do what the config asks are exit 2 with nothing created. The diffusion stage imports a
tiny real diffusers model the tests save (diffusion.checkpoint)."""
import os

import h5py
import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, SMOKE, run_cli
from tests.e2e.test_user_errors import assert_user_error
from tests.stages.generator_fixture import read_pool, save_tiny_generator


@pytest.fixture(scope="module")
def env():
    """This checkout's code in the CLI's processes, not an installed rst-mart's."""
    return {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    base = tmp_path_factory.mktemp("generators")
    return {"conditional": save_tiny_generator(base / "c") / "model",
            "unconditional": save_tiny_generator(base / "u", num_classes=0) / "model"}


GENERATE = ["--set", "pool.provider=generate", "--set", "pool.limit=0", "--set", "generate.n=50",
            "--set", "generate.steps=3", "--set", "generate.shard_size=16", "--set", "generate.batch_size=16"]


def test_pseudolabel_reads_the_generated_pool(tmp_path, env, generators):
    workdir = tmp_path / "w"

    def cli(command, *args):  # args last: their --set overrides GENERATE's
        return run_cli(command, "--config", SMOKE, "--workdir", workdir, *GENERATE, "--set",
                       f"diffusion.checkpoint={generators['conditional']}", *args, env=env).stdout

    out = cli("run", "--stages", "pseudolabel")
    assert "generate: missing, running (needed upstream)" in out and "pseudolabel: ran in" in out
    assert "pseudolabel agreement" in " ".join(out.split())  # the results table: sweep.csv's pseudolabel.agreement
    images, conditioning = read_pool(workdir / "generate")
    with h5py.File(workdir / "pseudolabel" / "pseudolabels.h5", "r") as f:
        assert f.attrs["pool_name"].startswith("generate:") and len(f["images"]) == 50
        assert (f["images"][()] == images).all() and (f["pool_index"][()] == np.arange(50)).all()
        labels, confidence = f["labels"][()], f["confidence"][()]
        generate_fp = f.attrs["pool_fingerprint"]
    quality = pd.read_csv(workdir / "pseudolabel" / "quality.csv").set_index("class")
    assert (quality["measured_against"] == "conditioning classes").all()
    assert quality.loc["all", "precision"] == pytest.approx(np.mean(labels == conditioning))
    assert generate_fp == (workdir / "generate").resolve().name  # the pool's fingerprint is the generate stage's

    # The most confident half of each class, in pool order, from the same teacher and pool (both cached).
    out = cli("run", "--stages", "pseudolabel", "--set", "pseudolabel.keep_top_fraction=0.5")
    assert "generate: cached" in out and "teacher: cached" in out
    with h5py.File(workdir / "pseudolabel" / "pseudolabels.h5", "r") as f:
        kept = f["pool_index"][()]
        assert (np.diff(kept) > 0).all() and (f["labels"][()] == labels[kept]).all()
        assert (f["images"][()] == images[kept]).all()
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        chosen = np.intersect1d(rows, kept)
        assert len(chosen) == int(np.ceil(len(rows) / 2))
        dropped = np.setdiff1d(rows, kept)
        assert not len(dropped) or confidence[chosen].min() >= confidence[dropped].max()
    assert not (workdir / "pseudolabel" / "pseudolabels-all.h5").exists()

    status = cli("status", "--stages", "pseudolabel", "--set", "pseudolabel.keep_top_fraction=0.5")
    lines = dict(line.split(": ", 1) for line in status.splitlines())
    assert all(lines[stage].startswith("fresh") for stage in ("generate", "teacher", "pseudolabel"))
    status = cli("status", "--stages", "pseudolabel", "--set", "pseudolabel.keep_top_fraction=0.5",
                 "--set", "generate.n=60")
    lines = dict(line.split(": ", 1) for line in status.splitlines())
    assert lines["generate"].startswith("stale, generate.n changed (50 -> 60)")
    assert lines["pseudolabel"].startswith("stale, input generate changed")


@pytest.mark.parametrize("override, fragment", [
    ("generate.n=0", "`generate.n` is 0"),
    ("generate.steps=0", "`generate.steps` is 0"),
    ("generate.steps=1001", "`generate.steps` is 1001"),
    ("generate.shard_size=0", "`generate.shard_size` is 0"),
    ("generate.shard_size=10", "Set generate.shard_size to at least 245"),  # 10**6 images in 100,000 shards
    ("generate.sampler=euler", "`generate.sampler` is 'euler'"),
    ("pool.limit=10", "`pool.limit` is 10"),
    ("pool.path=pool.npz", "pool.path is set too"),
])
def test_bad_generate_values_fail_before_anything_is_made(tmp_path, env, override, fragment):
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", "--stages", "generate", "--set",
                   "pool.provider=generate", "--set", "pool.limit=0", "--set", "generate.n=1000000", "--set", override,
                   env=env, check=False)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "w").exists() and not (tmp_path / "store").exists()


def test_balanced_classes_from_an_unconditional_model_are_refused(tmp_path, env, generators):
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", "--stages", "generate", *GENERATE,
                   "--set", f"diffusion.checkpoint={generators['unconditional']}", env=env, check=False)
    assert_user_error(proc, "`generate.balanced` is true but the diffusion model is unconditional",
                      "Set generate.balanced = false")
    made = tmp_path / "store" / "generate"
    assert not [p.name for p in made.iterdir() if not p.name.endswith(".lock")]  # no entry, no partial directory
    assert not (tmp_path / "w" / "generate").exists()


def test_a_killed_generate_run_shows_its_shards_in_status_and_resumes(tmp_path, env, generators):
    import signal
    import subprocess
    import sys
    import time

    settings = ["--config", SMOKE, "--workdir", tmp_path / "w", *GENERATE, "--set", "generate.n=160", "--set",
                "generate.shard_size=8", "--set", "generate.batch_size=8", "--set",
                f"diffusion.checkpoint={generators['conditional']}"]
    environment = {**os.environ, **env, "RST_MART_STORE": str(tmp_path / "store")}
    run = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--stages", "generate", *map(str, settings)],
                           cwd=ROOT, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "store" / "generate").glob("*.partial/shard-00001.h5")):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its second shard"
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    assert run.wait(timeout=60) == -signal.SIGKILL
    status = run_cli("status", "--stages", "generate", *settings, env=env).stdout
    line = next(line for line in status.splitlines() if line.startswith("generate: "))
    made = int(line.split("(")[1].split(" of ")[0])
    assert line.startswith("generate: missing (") and "of 20 shards made)" in line and 2 <= made < 20
    out = run_cli("run", "--stages", "generate", *settings, env=env).stdout
    assert "generate: ran in" in out
    images, labels = read_pool(tmp_path / "w" / "generate")
    assert images.shape == (160, 28, 28, 1) and (labels == np.arange(160) % 10).all()
    assert sorted(p.name for p in (tmp_path / "w" / "generate").iterdir()) == sorted(
        [f"shard-{s:05d}.h5" for s in range(20)] + ["stage.json"])


def test_local_jobs_make_the_shards_of_the_serial_pool(tmp_path, env, generators):
    settings = ["--config", SMOKE, *GENERATE, "--set", "generate.n=40", "--set", "generate.shard_size=8", "--set",
                "generate.batch_size=8", "--set", f"diffusion.checkpoint={generators['conditional']}"]
    out = run_cli("run", "--stages", "generate", "--workdir", tmp_path / "jobs", *settings, "--launcher", "local",
                  "--jobs", "2", env=env).stdout
    assert "generate: 5 shards, made by 2 local job(s)" in out and "generate: ran in" in out
    run_cli("run", "--stages", "generate", "--workdir", tmp_path / "serial", *settings, env=env)
    jobs, jobs_labels = read_pool(tmp_path / "jobs" / "generate")
    serial, serial_labels = read_pool(tmp_path / "serial" / "generate")
    assert jobs.shape == (40, 28, 28, 1) and (jobs == serial).all() and (jobs_labels == serial_labels).all()


def test_the_whole_generated_chain_from_the_smoke_config(tmp_path):
    """configs/smoke_generated.toml: a generator trained on the labeled images, its pool, the teacher's labels
    on it (half kept), MART on the mix; a rerun takes every stage from the store."""
    config = ROOT / "configs" / "smoke_generated.toml"
    stages = "diffusion,generate,teacher,pseudolabel,mart"
    workdir = tmp_path / "w"
    first = run_cli("run", "--config", config, "--workdir", workdir, "--stages", stages)
    for stage in stages.split(","):
        assert f"{stage}: ran in" in first.stdout
    with h5py.File(workdir / "pseudolabel" / "pseudolabels.h5") as f:
        assert 300 <= len(f["labels"]) <= 305  # ceil(half) of each teacher class's images, of 600
        assert f["images"].shape[1:] == (28, 28, 1)
    quality = pd.read_csv(workdir / "pseudolabel" / "quality.csv")
    assert (quality["measured_against"] == "conditioning classes").all()
    results = pd.read_csv(workdir / "mart" / "results.csv")
    assert set(results["attack"]) >= {"clean", "pgd20"}
    again = run_cli("run", "--config", config, "--workdir", workdir, "--stages", stages)
    assert all(f"{stage}: cached" in again.stdout for stage in stages.split(","))
