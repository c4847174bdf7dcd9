"""kill -9 in the middle of a stage, rerun: it resumes, says so, and ends bit-identical (CPU) to the
uninterrupted smoke run."""
import shutil

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import SMOKE, kill_when, run_cli


def kill_when_checkpointed(workdir, stage, timeout=120):
    """Start the smoke run, SIGKILL it as soon as `stage` has written its first training checkpoint."""
    store = workdir.parent / "store" / stage  # the test's stage store (tests/conftest.py)
    kill_when(["--config", SMOKE, "--workdir", workdir, "--set", "run.checkpoint_every_s=0"],
              lambda: list(store.glob("*.partial/train_state.pt")), timeout=timeout)
    assert not (workdir / stage).exists(), "the kill came too late to interrupt the stage"


def assert_same_weights(a, b):
    sa = torch.load(a, weights_only=True)["state_dict"]
    sb = torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("stage", ["teacher", "mart"])
def test_kill_9_then_resume_equals_uninterrupted(smoke_workdir, tmp_path, stage):
    workdir = tmp_path / "w"
    workdir.mkdir()
    if stage == "mart":  # start from the same upstream artifacts
        for upstream in ("teacher", "pseudolabel"):
            shutil.copytree(smoke_workdir / upstream, workdir / upstream)
    kill_when_checkpointed(workdir, stage)
    proc = run_cli("run", "--config", SMOKE, "--workdir", workdir)
    assert "resumed from checkpoint" in proc.stdout
    assert_same_weights(workdir / stage / "model.pt", smoke_workdir / stage / "model.pt")
    if stage == "teacher":
        with h5py.File(workdir / "pseudolabel" / "pseudolabels.h5") as f, \
                h5py.File(smoke_workdir / "pseudolabel" / "pseudolabels.h5") as g:
            assert np.array_equal(f["labels"][:], g["labels"][:])
    assert not list((tmp_path / "store").glob("*/*.partial"))


@pytest.mark.parametrize("threaded", [True, False], ids=["io-threads", "io-at-submit"])
def test_pseudolabel_resumes_at_block_granularity(smoke_workdir, tmp_path, monkeypatch, threaded):
    """An interrupted pseudolabel stage continues after the last block written, same file in the end, whether
    it reads and writes in threads (a GPU, a spare core) or in the teacher's thread (every core busy)."""
    from data import pseudolabel_writer
    from ml import labeling
    from pipeline.config import load_config
    from pipeline.runner import Runner

    monkeypatch.setattr(labeling, "prefetch_depth", lambda requested, device: requested if threaded else 0)
    monkeypatch.setattr(labeling, "COMMIT_SECONDS", 0.0)  # every block durable: the granularity under test

    workdir = tmp_path / "w"
    shutil.copytree(smoke_workdir / "teacher", workdir / "teacher")
    config = load_config(SMOKE, ["pseudolabel.batch_size=256"])
    original_append = pseudolabel_writer.PseudoLabelWriter.append
    calls = {"n": 0}

    def append_then_die(self, **kwargs):
        original_append(self, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed right after the third block reached the disk

    monkeypatch.setattr(pseudolabel_writer.PseudoLabelWriter, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        Runner(config, workdir, log=lambda m: None).run(["pseudolabel"])
    monkeypatch.setattr(pseudolabel_writer.PseudoLabelWriter, "append", original_append)
    lines = []
    Runner(config, workdir, log=lines.append).run(["pseudolabel"])
    assert any("resumed at pool row 768 of 2000" in line for line in lines)
    with h5py.File(workdir / "pseudolabel" / "pseudolabels.h5") as f, \
            h5py.File(smoke_workdir / "pseudolabel" / "pseudolabels.h5") as g:
        for key in ("images", "labels", "pool_index"):
            assert np.array_equal(f[key][:], g[key][:]), key
        assert np.allclose(f["confidence"][:], g["confidence"][:], atol=1e-6)
