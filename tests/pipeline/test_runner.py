"""Caching, staleness and the stage store, with spy stages (no training): the runner's rules, fast."""
import dataclasses
import json
import os
from unittest import mock

import pytest

from pipeline.config import Config
from pipeline.core.errors import UserError
from pipeline.runner import Runner
from pipeline.stage import Source, Stage


class FakeSources:
    """Data sources whose fingerprints the tests set and whose opens they count."""

    def __init__(self):
        self.fingerprints = {"labeled": "labeled-v1", "pool": "pool-v1"}
        self.opened = []
        self.labeled = self.source("labeled")
        self.pool = self.source("pool")

    def source(self, name):
        return Source(name, lambda config: self.fingerprints[name], lambda config, cache: self.opened.append(name))


def writer(name):
    def run(ctx):
        (ctx.out_dir / "out.txt").write_text(f"{name} {ctx.fingerprint}")
    return mock.Mock(side_effect=run)


@pytest.fixture
def sources():
    return FakeSources()


@pytest.fixture
def stages(sources):
    return {
        "teacher": Stage("teacher", 1, "teacher", ("out.txt",), writer("teacher"),
                         inputs=lambda c: (sources.labeled,), reads=("run.seed",)),
        "pseudolabel": Stage("pseudolabel", 1, "pseudolabel", ("out.txt",), writer("pseudolabel"),
                             inputs=lambda c: ("teacher", sources.labeled, sources.pool),
                             insignificant=("batch_size",)),
        "mart": Stage("mart", 1, "mart", ("out.txt",), writer("mart"), inputs=lambda c: ("pseudolabel",)),
    }


def make_runner(tmp_path, stages, config=None, workdir="w"):
    lines = []
    config = config or Config()
    config.run.store = str(tmp_path / "store")
    runner = Runner(config, tmp_path / workdir, log=lines.append, stages=stages)
    return runner, lines


def test_first_run_runs_everything_then_everything_is_cached(tmp_path, stages):
    runner, lines = make_runner(tmp_path, stages)
    runner.run(["mart"])
    for stage in stages.values():
        stage.run.assert_called_once()
        record = json.loads((tmp_path / "w" / stage.name / "stage.json").read_text())
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


def test_insignificant_keys_and_pool_fingerprint(tmp_path, stages, sources):
    make_runner(tmp_path, stages)[0].run(["mart"])
    config = Config()
    config.pseudolabel.batch_size = 7  # declared insignificant
    assert all(p.fresh for p in make_runner(tmp_path, stages, config)[0].plan(["mart"]))
    sources.fingerprints["pool"] = "pool-v2"  # the pool file was replaced
    plans = make_runner(tmp_path, stages)[0].plan(["mart"])
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
    (tmp_path / "w" / "teacher" / "out.txt").unlink()
    plan = make_runner(tmp_path, stages)[0].plan(["teacher"])[0]
    assert not plan.fresh and plan.reason == "stale, output out.txt missing"


def test_a_crashed_stage_leaves_nothing_that_looks_done(tmp_path, stages):
    def crash(ctx):
        (ctx.out_dir / "out.txt").write_text("half")
        raise KeyboardInterrupt
    stages["teacher"] = Stage("teacher", 1, "teacher", ("out.txt",), crash)
    runner = make_runner(tmp_path, stages)[0]
    with pytest.raises(KeyboardInterrupt):
        runner.run(["teacher"])
    plan = runner.plan(["teacher"])[0]
    assert not (tmp_path / "w" / "teacher").exists() and not plan.entry.exists()
    assert (tmp_path / "store" / "teacher" / f"{plan.fingerprint}.partial" / "out.txt").exists()  # resume state
    assert plan.reason == "missing"


def test_a_stage_that_forgets_an_output_is_a_bug_not_done(tmp_path, stages):
    stages["teacher"] = Stage("teacher", 1, "teacher", ("out.txt", "other.txt"), writer("teacher"))
    with pytest.raises(RuntimeError, match="other.txt"):
        make_runner(tmp_path, stages)[0].run(["teacher"])
    assert not (tmp_path / "w" / "teacher").exists()


def test_a_partial_dir_is_resumed_only_by_its_own_fingerprint(tmp_path, stages):
    seen = []

    def run(ctx):
        seen.append((ctx.out_dir / "leftover").exists())
        (ctx.out_dir / "out.txt").write_text("x")
    stages["teacher"] = Stage("teacher", 1, "teacher", ("out.txt",), run)
    runner = make_runner(tmp_path, stages)[0]
    fp = runner.plan(["teacher"])[0].fingerprint
    for name in (f"{'0' * 64}.partial", f"{fp}.partial"):  # another fingerprint's, then this one's
        partial = tmp_path / "store" / "teacher" / name
        partial.mkdir(parents=True)
        (partial / "leftover").write_text("resume state")
    runner.run(["teacher"])
    assert seen == [True]
    assert not (tmp_path / "store" / "teacher" / f"{fp}.partial").exists()


def test_unknown_stage_is_a_user_error(tmp_path, stages):
    with pytest.raises(UserError, match="unknown stage"):
        make_runner(tmp_path, stages)[0].run(["teachr"])


# -- the store --------------------------------------------------------------------------------------
def reset(stages):
    for stage in stages.values():
        stage.run.reset_mock()


def test_a_parameter_changed_and_changed_back_reruns_nothing(tmp_path, stages):
    make_runner(tmp_path, stages)[0].run(["mart"])
    config = Config()
    config.mart.beta = 3.0
    make_runner(tmp_path, stages, config)[0].run(["mart"])
    reset(stages)
    runner, lines = make_runner(tmp_path, stages)
    runner.run(["mart"])
    for stage in stages.values():
        stage.run.assert_not_called()
    assert lines == ["teacher: cached", "pseudolabel: cached", "mart: cached"]
    assert (tmp_path / "w" / "mart").resolve() == runner.plan(["mart"])[2].entry.resolve()


def test_two_work_dirs_share_one_teacher_entry(tmp_path, stages):
    make_runner(tmp_path, stages, workdir="a")[0].run(["mart"])
    reset(stages)
    config = Config()
    config.mart.beta = 1.0
    make_runner(tmp_path, stages, config, workdir="b")[0].run(["mart"])
    stages["teacher"].run.assert_not_called()
    stages["pseudolabel"].run.assert_not_called()
    stages["mart"].run.assert_called_once()
    assert (tmp_path / "a" / "teacher").resolve() == (tmp_path / "b" / "teacher").resolve()
    assert (tmp_path / "a" / "mart").resolve() != (tmp_path / "b" / "mart").resolve()


def test_a_corrupted_output_of_unchanged_size_is_stale_and_rebuilt(tmp_path, stages):
    make_runner(tmp_path, stages)[0].run(["mart"])
    out = tmp_path / "w" / "pseudolabel" / "out.txt"
    text = out.read_text()
    out.write_text(text[:-1] + ("X" if text[-1] != "X" else "Y"))
    assert make_runner(tmp_path, stages)[0].plan(["mart"])[1].fresh  # status checks sizes only
    plan = make_runner(tmp_path, stages)[0].plan(["mart"], verify=True)[1]
    assert not plan.fresh and plan.reason == "stale, output out.txt changed (checksum)"
    reset(stages)
    runner, lines = make_runner(tmp_path, stages)
    runner.run(["mart"])
    stages["pseudolabel"].run.assert_called_once()
    assert out.read_text() == text
    assert "pseudolabel: stale, output out.txt changed (checksum), running (needed upstream)" in lines


def test_a_pre_store_stage_directory_is_adopted_into_the_store(tmp_path, stages):
    runner = make_runner(tmp_path, stages)[0]
    runner.run(["teacher"])
    entry = (tmp_path / "w" / "teacher").resolve()
    link = tmp_path / "w" / "teacher"
    link.unlink()
    entry.rename(link)  # as an older rst-mart left it: a plain directory in the work dir
    reset(stages)
    runner, lines = make_runner(tmp_path, stages)
    runner.run(["teacher"])
    stages["teacher"].run.assert_not_called()  # found by the fingerprint in its stage.json
    assert link.is_symlink() and (link / "out.txt").exists()


def test_gc_keeps_what_is_referenced(tmp_path, stages):
    from pipeline.store import Store

    make_runner(tmp_path, stages)[0].run(["mart"])
    config = Config()
    config.mart.beta = 3.0
    make_runner(tmp_path, stages, config)[0].run(["mart"])  # the beta=6 mart entry is now unreferenced
    store = Store(tmp_path / "store")
    unreferenced = store.collect().removable
    assert [e.parent.name for e in unreferenced] == ["mart"]
    assert all((tmp_path / "w" / s).resolve() not in unreferenced for s in ("teacher", "pseudolabel", "mart"))


def test_a_second_run_on_a_locked_work_dir_is_refused(tmp_path, stages):
    from pipeline.core import locks

    (tmp_path / "w").mkdir()
    with locks.exclusive(tmp_path / "w" / ".lock"):
        with pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on host"):
            make_runner(tmp_path, stages)[0].run(["teacher"])
    stages["teacher"].run.assert_not_called()
    make_runner(tmp_path, stages)[0].run(["teacher"])  # released: the next run goes ahead
    stages["teacher"].run.assert_called_once()


def test_sources_are_opened_only_for_stages_that_run(tmp_path, stages, sources):
    make_runner(tmp_path, stages)[0].run(["mart"])
    assert sorted(sources.opened) == ["labeled", "pool"]
    sources.opened.clear()
    config = Config()
    config.mart.beta = 3.0
    make_runner(tmp_path, stages, config)[0].run(["mart"])
    make_runner(tmp_path, stages)[0].plan(["mart"], verify=True)
    assert sources.opened == []  # mart reads neither; pseudolabel is cached


def test_a_read_only_store_is_a_user_error(tmp_path, stages):
    if os.geteuid() == 0:
        config = Config()
        config.run.store = "/proc/rst-mart-store"  # not writable even for root
        with pytest.raises(UserError, match="not writable"):
            Runner(config, tmp_path / "w", log=lambda m: None, stages=stages).run(["teacher"])
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        config = Config()
        config.run.store = str(tmp_path / "ro" / "store")
        with pytest.raises(UserError, match="not writable"):
            Runner(config, tmp_path / "w", log=lambda m: None, stages=stages).run(["teacher"])


def test_the_world_size_enters_the_fingerprints_of_stages_it_changes(tmp_path, stages, monkeypatch):
    stages["teacher"] = dataclasses.replace(stages["teacher"], distributed_changes_results=True)

    def plan(world_size):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        return {p.stage.name: p for p in make_runner(tmp_path, stages)[0].plan(["mart"])}

    one, two, three = plan(1), plan(2), plan(3)
    # At world size 1 nothing is added: entries built before the world size counted stay valid.
    assert "run.world_size" not in one["teacher"].params and one["teacher"].params == stages["teacher"].params(Config())
    assert two["teacher"].params["run.world_size"] == 2 and "run.sync_bn" in two["teacher"].params
    assert len({p["teacher"].fingerprint for p in (one, two, three)}) == 3
    # A stage that does not declare it keeps its params; its fingerprint follows its inputs.
    assert two["pseudolabel"].params == one["pseudolabel"].params
    assert two["pseudolabel"].fingerprint != one["pseudolabel"].fingerprint


def test_the_training_stages_declare_that_the_world_size_changes_their_weights():
    from pipeline.stage_registry import stages as registered_stages

    changed = {name for name, stage in registered_stages().items() if stage.distributed_changes_results}
    assert changed == {"diffusion", "teacher", "mart"}
