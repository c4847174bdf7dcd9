"""The pipeline under torchrun: 2 CPU processes on gloo, end to end through the CLI, plus DDP agreement
across ranks and the pseudolabel shards. About a minute on 2 cores (each torchrun starts 2 interpreters)."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from data.mixed import MixedBatchSampler
from data.pseudolabel_file import validate_pseudolabels
from pipeline.core.distributed import shard_range
from tests.conftest import ROOT, SMOKE
from tests.distributed import ddp_worker

NPROC = 2


def torchrun(*args, timeout=240, check=True, env=None):
    """`torchrun --nproc_per_node=2 --standalone ...` from the repo root, one thread per process."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NPROC}", "--standalone", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def run_pipeline(workdir, *extra, env=None):
    return torchrun("-m", "pipeline", "run", "--config", SMOKE, "--workdir", workdir, "--set", "run.device=cpu",
                    *extra, env=env)


@pytest.fixture(scope="module")
def torchrun_workdir(tmp_path_factory):
    """One smoke pipeline run under torchrun, shared by the tests below (treat it as read-only)."""
    base = tmp_path_factory.mktemp("smoke-torchrun")
    proc = run_pipeline(base / "w", env={"RST_MART_STORE": str(base / "store")})
    return base / "w", proc


def test_smoke_pipeline_under_torchrun_writes_every_output_once(torchrun_workdir):
    workdir, proc = torchrun_workdir
    expected = {"teacher": ["model.pt", "metrics.csv", "results.csv"],
                "pseudolabel": ["pseudolabels.h5", "results.csv", "quality.csv"],
                "mart": ["model.pt", "last.pt", "metrics.csv", "results.csv"]}
    for stage, files in expected.items():
        record = json.loads((workdir / stage / "stage.json").read_text())
        assert set(record["outputs"]) == set(files)
        for name in files:
            assert (workdir / stage / name).stat().st_size == record["outputs"][name]["size"]
        assert not list(workdir.parent.glob(f"store/{stage}/*.partial"))
    assert not (workdir / "pseudolabel" / "shards").exists()
    assert proc.stdout.count("mart: ran in") == 1  # only rank 0 prints
    path = workdir / "pseudolabel" / "pseudolabels.h5"
    validate_pseudolabels(path)
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["pool_index"][:], np.arange(2000))  # every pool row, once, in pool order
        assert f["images"].shape == (2000, 28, 28, 1)
    # An identical second invocation plans the same on both ranks and touches nothing.
    again = run_pipeline(workdir)
    for stage in ("teacher", "pseudolabel", "mart"):
        assert again.stdout.count(f"{stage}: cached") == 1, again.stdout


def test_ddp_ranks_agree_and_split_every_global_batch(tmp_path):
    out = tmp_path / "ddp.json"
    torchrun("-m", "tests.distributed.ddp_worker", out)
    report = json.loads(out.read_text())
    assert report["world_size"] == NPROC
    assert report["params_moved"]
    assert report["grads_identical"] and report["params_identical"]
    assert report["eval_sharded"] == report["eval_whole"]  # every image once, with its batch's own seed
    per_rank = report["labeled"]
    single = MixedBatchSampler(ddp_worker.NUM_LABELED, ddp_worker.NUM_POOL, **ddp_worker.SAMPLER_ARGS)
    expected = []
    for epoch in range(ddp_worker.EPOCHS):
        single.set_epoch(epoch)
        expected += [(epoch, b, lab.tolist()) for b, lab, _ in single.iter_batches()]
    assert all(len(rank) == len(expected) for rank in per_rank)
    for i, (epoch, b, whole) in enumerate(expected):
        parts = [rank[i] for rank in per_rank]
        assert all((p["epoch"], p["batch"]) == (epoch, b) for p in parts)
        rows = [p["labeled"] for p in parts]
        assert len({len(r) for r in rows}) == 1  # the same labeled share on every rank
        assert not set(rows[0]) & set(rows[1])  # disjoint
        assert sum(rows, []) == whole  # together, in rank order: the world_size=1 batch


@pytest.mark.parametrize("total", [0, 1, 5, 511, 512, 513, 2000, 2049])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("block", [1, 256])
def test_shards_are_contiguous_disjoint_and_cover_the_pool(total, world_size, block):
    shards = [shard_range(total, r, world_size, block) for r in range(world_size)]
    assert shards[0][0] == 0 and shards[-1][1] == total
    for (a, b), (c, _) in zip(shards, shards[1:]):
        assert a <= b == c  # each starts where the previous stopped: disjoint and gap-free
    for a, b in shards:
        assert a % block == 0 and (b % block == 0 or b == total)  # cut at block (batch) boundaries
    blocks = [-(-(b - a) // block) for a, b in shards]
    assert max(blocks) - min(blocks) <= 1  # balanced to within one block


def run_pseudolabel_stage(config, out_dir, teacher_dir, dist, data=None, log=lambda message: None):
    """pseudolabel.run in this process, as the runner calls it, as rank `dist.rank` of `dist.world_size`
    (without a process group the barriers are no-ops, so ranks can be played in turn)."""
    from pipeline.stage import StageContext, StageInput
    from stages import pseudolabel

    out_dir.mkdir(parents=True, exist_ok=True)
    teacher_fingerprint = json.loads((teacher_dir / "stage.json").read_text())["fingerprint"]
    pseudolabel.run(StageContext(
        config=config, out_dir=out_dir, inputs={"teacher": StageInput(teacher_dir, teacher_fingerprint)},
        sources=data or open_sources(config, out_dir), fingerprint="test", dist=dist, log=log))


def open_sources(config, cache_dir):
    """The sources pseudolabel reads, opened as the runner opens them."""
    from data.sources import open_labeled, open_pool_source

    return {"labeled": open_labeled(config), "pool": open_pool_source(config, cache_dir)}


def test_merged_pseudolabels_equal_the_single_process_file(torchrun_workdir, tmp_path):
    """The file rank 0 merged from 2 shards equals the one a single process writes with the same teacher
    (shards are cut at block boundaries, so every teacher forward sees the same batch)."""
    from pipeline.config import load_config
    from pipeline.core.distributed import DistInfo

    workdir, _ = torchrun_workdir
    run_pseudolabel_stage(load_config(SMOKE, ["run.device=cpu"]), tmp_path, workdir / "teacher", DistInfo())
    merged, single = workdir / "pseudolabel" / "pseudolabels.h5", tmp_path / "pseudolabels.h5"
    assert validate_pseudolabels(merged) == validate_pseudolabels(single)
    with h5py.File(merged, "r") as f, h5py.File(single, "r") as g:
        assert np.array_equal(f["pool_index"][:], g["pool_index"][:])
        assert np.array_equal(f["images"][:], g["images"][:])
        assert (f["labels"][:] == g["labels"][:]).mean() >= 0.999
        assert np.allclose(f["confidence"][:], g["confidence"][:], atol=1e-5)


def test_sharded_pseudolabel_with_dropped_rows_and_logits_merges_like_one_process(torchrun_workdir, tmp_path):
    """The shard-and-merge path with ranks played in turn in this process: uneven shards of 3 ranks,
    rows dropped by dedup_test, logits kept."""
    from pipeline.config import load_config
    from pipeline.core.distributed import DistInfo

    config = load_config(SMOKE, ["run.device=cpu", "pool.limit=300", "pseudolabel.batch_size=64",
                                 "pseudolabel.save_logits=true", "pseudolabel.dedup_test=true",
                                 "pseudolabel.dedup_threshold=3.0"])
    data, teacher = open_sources(config, tmp_path), torchrun_workdir[0] / "teacher"
    for rank in (2, 1, 0):  # rank 0 last: it merges once the others are done
        run_pseudolabel_stage(config, tmp_path / "sharded", teacher, DistInfo(rank, 3, rank), data)
    run_pseudolabel_stage(config, tmp_path / "single", teacher, DistInfo(), data)
    assert not (tmp_path / "sharded" / "shards").exists()
    merged, single = tmp_path / "sharded" / "pseudolabels.h5", tmp_path / "single" / "pseudolabels.h5"
    assert validate_pseudolabels(merged) == validate_pseudolabels(single)
    with h5py.File(merged, "r") as f, h5py.File(single, "r") as g:
        assert 0 < len(g["labels"]) < 300  # dedup dropped some rows, not all
        for key in ("images", "labels", "pool_index", "confidence", "logits"):
            assert np.array_equal(f[key][:], g[key][:]), key


def test_an_interrupted_shard_resumes_at_its_last_block(torchrun_workdir, tmp_path, monkeypatch):
    from data import pseudolabel_writer
    from ml import labeling
    from pipeline.config import load_config
    from pipeline.core.distributed import DistInfo

    monkeypatch.setattr(labeling, "COMMIT_SECONDS", 0.0)  # every block durable: the granularity under test

    config = load_config(SMOKE, ["run.device=cpu", "pool.limit=1000", "pseudolabel.batch_size=100"])
    data, teacher = open_sources(config, tmp_path), torchrun_workdir[0] / "teacher"
    original_append = pseudolabel_writer.PseudoLabelWriter.append
    calls = {"n": 0}

    def append_then_die(self, **kwargs):
        original_append(self, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if rank 1 were killed right after its second block reached the disk

    monkeypatch.setattr(pseudolabel_writer.PseudoLabelWriter, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):  # rank 1 of 2 owns pool rows [500, 1000)
        run_pseudolabel_stage(config, tmp_path / "sharded", teacher, DistInfo(1, 2, 1), data)
    monkeypatch.setattr(pseudolabel_writer.PseudoLabelWriter, "append", original_append)
    lines = []
    run_pseudolabel_stage(config, tmp_path / "sharded", teacher, DistInfo(1, 2, 1), data, log=lines.append)
    assert lines == ["  resumed at pool row 700 of 1000"]
    run_pseudolabel_stage(config, tmp_path / "sharded", teacher, DistInfo(0, 2, 0), data)
    run_pseudolabel_stage(config, tmp_path / "single", teacher, DistInfo(), data)
    with h5py.File(tmp_path / "sharded" / "pseudolabels.h5", "r") as f, \
            h5py.File(tmp_path / "single" / "pseudolabels.h5", "r") as g:
        for key in ("images", "labels", "pool_index", "confidence"):
            assert np.array_equal(f[key][:], g[key][:]), key


def test_a_user_error_under_the_launcher_is_one_paragraph_and_exit_2(tmp_path):
    """Plain torchrun reports any failed rank as exit 1 with a ChildFailedError traceback, and each rank
    prints the paragraph; `python -m pipeline.torchrun` prints it once, and nothing else that looks like a bug."""
    args = ["run", "--config", SMOKE, "--workdir", tmp_path / "w", "--set", "data.dataset=nope"]
    plain = torchrun("-m", "pipeline", *args, check=False)
    assert plain.returncode == 1 and "ChildFailedError" in plain.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline.torchrun", "--standalone", f"--nproc-per-node={NPROC}",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error: ") == 1 and "data.dataset = 'nope' is not a known dataset" in proc.stderr
    for noise in ("Traceback", "ChildFailedError", "failed (exitcode"):
        assert noise not in proc.stderr + proc.stdout, proc.stderr
    assert not (tmp_path / "w").exists()


def test_a_teacher_trained_by_2_ranks_is_not_the_1_process_teacher(torchrun_workdir):
    """Each rank's BatchNorm statistics and augmentation draws cover its slice of the batch, so 2 ranks
    train other weights than 1 process: the store must not hand out one for the other."""
    from pipeline.config import load_config
    from pipeline.runner import Runner

    workdir, _ = torchrun_workdir
    for stage in ("teacher", "mart"):
        record = json.loads((workdir / stage / "stage.json").read_text())
        assert record["params"]["run.world_size"] == NPROC
    single = {p.stage.name: p for p in Runner(load_config(SMOKE, ["run.device=cpu"]), workdir).plan(["mart"])}
    for stage in ("teacher", "pseudolabel", "mart"):
        built = json.loads((workdir / stage / "stage.json").read_text())["fingerprint"]
        assert single[stage].fingerprint != built and not single[stage].fresh
    assert "run.world_size removed" in single["teacher"].reason
    # Asked at the world size it was built with, the work dir is fresh, and only rank 0 prints.
    proc = subprocess.run([sys.executable, "-m", "pipeline.torchrun", "--standalone", f"--nproc-per-node={NPROC}",
                           "status", "--config", str(SMOKE), "--workdir", str(workdir), "--set", "run.device=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "RST_MART_STORE": str(workdir.parent / "store")})
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[:2] for line in proc.stdout.splitlines()] == [
        ["teacher:", "fresh"], ["pseudolabel:", "fresh"], ["mart:", "fresh"]], proc.stdout


def test_a_crashed_rank_under_the_launcher_gets_torchruns_failure_summary_and_exit_1(tmp_path):
    # Every rank dies at start-up with status 3 (a sitecustomize that only torchrun's children run): a
    # crash, not a user error.
    (tmp_path / "sitecustomize.py").write_text("import os\nif 'LOCAL_RANK' in os.environ:\n    os._exit(3)\n")
    proc = subprocess.run([sys.executable, "-m", "pipeline.torchrun", "--standalone", f"--nproc-per-node={NPROC}",
                           "run", "--config", str(SMOKE), "--workdir", str(tmp_path / "w")],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert proc.returncode == 1, proc.stderr
    assert "pipeline FAILED" in proc.stderr and "exitcode  : 3" in proc.stderr
    assert "error: " not in proc.stderr and "Traceback" not in proc.stderr
