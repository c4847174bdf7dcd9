"""Caching and staleness, with spy stages (no training): the runner's rules, fast."""
import json
from unittest import mock

import pytest

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.runner import Runner, Stage


class FakeData:
    def __init__(self):
        self.pool = mock.Mock()
        self.pool.fingerprint.return_value = "pool-v1"

    def fingerprint(self):
        return "labeled-v1"

    def ensure_pool(self):
        return self.pool


def writer(name):
    def run(ctx):
        (ctx.out_dir / "out.txt").write_text(f"{name} {ctx.fingerprint}")
    return mock.Mock(side_effect=run)


@pytest.fixture
def stages():
    return {
        "teacher": Stage("teacher", 1, "teacher", ("out.txt",), writer("teacher"), extra_params=("run.seed",)),
        "pseudolabel": Stage("pseudolabel", 1, "pseudolabel", ("out.txt",), writer("pseudolabel"),
                             requires=lambda c: ("teacher",), insignificant=("batch_size",), uses_pool=True),
        "mart": Stage("mart", 1, "mart", ("out.txt",), writer("mart"), requires=lambda c: ("pseudolabel",)),
    }


def make_runner(tmp_path, stages, config=None, data=None):
    lines = []
    runner = Runner(config or Config(), tmp_path, log=lines.append, stages=stages, data=data or FakeData())
    return runner, lines


def test_first_run_runs_everything_then_everything_is_cached(tmp_path, stages):
    runner, lines = make_runner(tmp_path, stages)
    runner.run(["mart"])
    for stage in stages.values():
        stage.run.assert_called_once()
        record = json.loads((tmp_path / stage.name / "stage.json").read_text())
        assert set(record) >= {"stage", "fingerprint", "params", "inputs", "code_version", "seconds",
                               "finished_at", "outputs"}
    assert "teacher: missing, running (needed upstream)" in lines
    for stage in stages.values():
        stage.run.reset_mock()
    runner, lines = make_runner(tmp_path, stages)
    runner.run(["mart"])
    for stage in stages.values():
        stage.run.assert_not_called()
    assert lines == ["teacher: cached", "pseudolabel: cached", "mart: cached"]


def test_changing_a_mart_key_reruns_only_mart(tmp_path, stages):
    make_runner(tmp_path, stages)[0].run(["mart"])
    for stage in stages.values():
        stage.run.reset_mock()
    config = Config()
    config.mart.beta = 3.0
    runner, lines = make_runner(tmp_path, stages, config)
    runner.run(["mart"])
    stages["teacher"].run.assert_not_called()
    stages["pseudolabel"].run.assert_not_called()
    stages["mart"].run.assert_called_once()
    assert any(line.startswith("mart: stale, mart.beta changed (6.0 -> 3.0)") for line in lines)


def test_changing_teacher_lr_makes_everything_downstream_stale(tmp_path, stages):
    make_runner(tmp_path, stages)[0].run(["mart"])
    config = Config()
    config.teacher.lr = 0.2
    plans = make_runner(tmp_path, stages, config)[0].plan(["mart"])
    assert [p.fresh for p in plans] == [False, False, False]
    assert "teacher.lr changed" in plans[0].reason
    assert "input teacher changed" in plans[1].reason
    assert "input pseudolabel changed" in plans[2].reason


def test_insignificant_keys_and_pool_fingerprint(tmp_path, stages):
    make_runner(tmp_path, stages)[0].run(["mart"])
    config = Config()
    config.pseudolabel.batch_size = 7  # declared insignificant
    assert all(p.fresh for p in make_runner(tmp_path, stages, config)[0].plan(["mart"]))
    data = FakeData()
    data.pool.fingerprint.return_value = "pool-v2"  # the pool file was replaced
    plans = make_runner(tmp_path, stages, data=data)[0].plan(["mart"])
    assert [p.fresh for p in plans] == [True, False, False]
    assert "input pool changed" in plans[1].reason


def test_force_reruns_only_the_named_stage(tmp_path, stages):
    make_runner(tmp_path, stages)[0].run(["mart"])
    for stage in stages.values():
        stage.run.reset_mock()
    make_runner(tmp_path, stages)[0].run(["pseudolabel"], force=True)
    stages["teacher"].run.assert_not_called()
    stages["pseudolabel"].run.assert_called_once()


def test_a_deleted_output_makes_the_stage_stale(tmp_path, stages):
    make_runner(tmp_path, stages)[0].run(["teacher"])
    (tmp_path / "teacher" / "out.txt").unlink()
    plan = make_runner(tmp_path, stages)[0].plan(["teacher"])[0]
    assert not plan.fresh and plan.reason == "output out.txt missing"


def test_a_crashed_stage_leaves_nothing_that_looks_done(tmp_path, stages):
    def crash(ctx):
        (ctx.out_dir / "out.txt").write_text("half")
        raise KeyboardInterrupt
    stages["teacher"] = Stage("teacher", 1, "teacher", ("out.txt",), crash)
    with pytest.raises(KeyboardInterrupt):
        make_runner(tmp_path, stages)[0].run(["teacher"])
    assert not (tmp_path / "teacher").exists()
    assert (tmp_path / "teacher.partial" / "out.txt").exists()  # resume state stays for the next run
    assert make_runner(tmp_path, stages)[0].plan(["teacher"])[0].reason == "missing"


def test_a_stage_that_forgets_an_output_is_a_bug_not_done(tmp_path, stages):
    stages["teacher"] = Stage("teacher", 1, "teacher", ("out.txt", "other.txt"), writer("teacher"))
    with pytest.raises(RuntimeError, match="other.txt"):
        make_runner(tmp_path, stages)[0].run(["teacher"])
    assert not (tmp_path / "teacher").exists()


def test_partial_dir_of_another_fingerprint_is_discarded(tmp_path, stages):
    seen = {}

    def run(ctx):
        seen["leftover"] = (ctx.out_dir / "leftover").exists()
        (ctx.out_dir / "out.txt").write_text("x")
    stages["teacher"] = Stage("teacher", 1, "teacher", ("out.txt",), run)
    partial = tmp_path / "teacher.partial"
    partial.mkdir()
    (partial / ".fingerprint").write_text("someone-else\n")
    (partial / "leftover").write_text("stale resume state")
    make_runner(tmp_path, stages)[0].run(["teacher"])
    assert seen["leftover"] is False


def test_unknown_stage_is_a_user_error(tmp_path, stages):
    with pytest.raises(UserError, match="unknown stage"):
        make_runner(tmp_path, stages)[0].run(["teachr"])
