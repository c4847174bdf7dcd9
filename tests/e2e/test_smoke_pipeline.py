"""The smoke config end to end through the CLI: outputs, formats, caching, status."""
import json

import h5py
import numpy as np
import pandas as pd
import torch

import pipeline
from data.pseudolabel_file import validate_pseudolabels
from tests.conftest import SMOKE, run_cli


def test_every_stage_writes_its_declared_outputs(smoke_workdir):
    expected = {"teacher": ["model.pt", "metrics.csv", "results.csv"],
                "pseudolabel": ["pseudolabels.h5", "results.csv", "quality.csv"],
                "mart": ["model.pt", "last.pt", "metrics.csv", "results.csv"]}
    for stage, files in expected.items():
        record = json.loads((smoke_workdir / stage / "stage.json").read_text())
        assert record["stage"] == stage and set(record["outputs"]) == set(files)
        for name in files:
            assert (smoke_workdir / stage / name).stat().st_size == record["outputs"][name]["size"]
        assert not list(smoke_workdir.parent.glob(f"store/{stage}/*.partial"))


def test_metrics_and_results_follow_the_schema(smoke_workdir):
    for stage in ("teacher", "mart"):
        metrics = pd.read_csv(smoke_workdir / stage / "metrics.csv")
        assert {"epoch", "step", "loss", "lr", "train_acc", "images_per_s", "seconds"} <= set(metrics.columns)
        assert list(metrics["epoch"]) == [1, 2]
        assert (metrics["images_per_s"] > 0).all()
    results = pd.read_csv(smoke_workdir / "mart" / "results.csv")
    assert list(results.columns) == ["model", "split", "attack", "eps", "accuracy", "n"]
    assert set(results["attack"]) == {"clean", "pgd20"}
    assert results["accuracy"].between(0, 1).all()
    pool = pd.read_csv(smoke_workdir / "pseudolabel" / "results.csv")
    assert list(pool.columns) == ["model", "split", "attack", "eps", "accuracy", "n"]
    overall = pool[pool["split"] == "pool"].iloc[0]
    assert overall["n"] == 2000 and 0.1 < overall["accuracy"] <= 1.0  # better than chance on 10 classes
    quality = pd.read_csv(smoke_workdir / "pseudolabel" / "quality.csv")
    assert list(quality.columns) == ["class", "count", "precision", "mean_confidence", "measured_against"]
    per_class = quality[quality["class"] != "all"]
    assert len(per_class) == 10 and per_class["count"].sum() == 2000  # the class histogram
    assert quality[quality["class"] == "all"]["precision"].iloc[0] == overall["accuracy"]


def test_pseudolabels_h5_schema(smoke_workdir):
    path = smoke_workdir / "pseudolabel" / "pseudolabels.h5"
    attrs = validate_pseudolabels(path)
    assert attrs["schema_version"] == 1 and attrs["num_classes"] == 10
    with h5py.File(path, "r") as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (2000, 28, 28, 1)
        assert f["images"].chunks is not None
        assert f["labels"].dtype == np.int64 and f["confidence"].dtype == np.float32
        assert np.array_equal(f["pool_index"][:], np.arange(2000))
        assert ((f["confidence"][:] > 0) & (f["confidence"][:] <= 1)).all()
        for key in ("class_names", "pool_name", "pool_fingerprint", "teacher_fingerprint"):
            assert key in f.attrs
    teacher_record = json.loads((smoke_workdir / "teacher" / "stage.json").read_text())
    assert attrs["teacher_fingerprint"] == teacher_record["fingerprint"]


def test_checkpoints_load_with_weights_only_and_take_unit_range_inputs(smoke_workdir):
    checkpoint = torch.load(smoke_workdir / "mart" / "model.pt", weights_only=True)
    assert {"arch", "num_classes", "in_channels", "mean", "std", "state_dict"} <= set(checkpoint)
    model = pipeline.load_model(smoke_workdir / "mart" / "model.pt")
    assert not model.training
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert pipeline.build_model("tiny-cnn", num_classes=10, in_channels=1)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_rerun_is_cached_and_status_is_fresh(smoke_workdir):
    def artifacts():  # every file the stages wrote, in the store entries the work dir links to
        return {p: p.stat().st_mtime_ns for stage in ("teacher", "pseudolabel", "mart")
                for p in (smoke_workdir / stage).resolve().rglob("*") if p.is_file()}

    before = artifacts()
    proc = run_cli("run", "--config", SMOKE, "--workdir", smoke_workdir)
    assert "teacher: cached" in proc.stdout and "pseudolabel: cached" in proc.stdout and "mart: cached" in proc.stdout
    assert artifacts() == before and len(before) >= 10
    status = run_cli("status", "--config", SMOKE, "--workdir", smoke_workdir).stdout
    assert status.count(": fresh") == 3
    stale = run_cli("status", "--config", SMOKE, "--workdir", smoke_workdir, "--set", "teacher.lr=0.2").stdout
    assert "teacher: stale, teacher.lr changed (0.05 -> 0.2)" in stale
    assert "pseudolabel: stale, input teacher changed" in stale and "mart: stale" in stale


def test_changing_beta_reruns_only_mart(smoke_workdir, tmp_path):
    import shutil

    workdir = tmp_path / "w"
    shutil.copytree(smoke_workdir, workdir)
    proc = run_cli("run", "--config", SMOKE, "--workdir", workdir, "--stages", "mart", "--set", "mart.beta=3")
    assert "teacher: cached" in proc.stdout and "pseudolabel: cached" in proc.stdout
    assert "mart: stale, mart.beta changed (6.0 -> 3.0), running" in proc.stdout
    assert json.loads((workdir / "mart" / "stage.json").read_text())["params"]["mart"]["beta"] == 3.0
