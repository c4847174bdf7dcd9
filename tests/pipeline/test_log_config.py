"""The [log] section: checked values, outside every fingerprint, handed to stages at run time, and a
missing package refused before any stage runs."""
import sys
from unittest import mock

import pytest

from pipeline.config import Config, load_config
from pipeline.core.errors import UserError
from pipeline.runner import Runner
from pipeline.stage import Stage
from pipeline.stage_registry import stages as registered_stages
from tests.conftest import SMOKE

LOG_ON = ["log.tensorboard=true", "log.wandb=true", "log.wandb_project=other", "log.wandb_mode=online",
          "log.every_steps=7"]


def test_log_keys_are_in_no_stage_fingerprint():
    off, on = load_config(SMOKE), load_config(SMOKE, LOG_ON)
    assert (on.log.tensorboard, on.log.wandb, on.log.wandb_mode, on.log.every_steps) == (True, True, "online", 7)
    for stage in registered_stages().values():
        assert stage.params(on) == stage.params(off), stage.name
        assert not any(key.startswith("log") for key in stage.params(on)), stage.name


@pytest.mark.parametrize("item, message", [("log.wandb_mode=cloud", "online"), ("log.every_steps=0", ">= 1"),
                                           ("log.colour=true", "unknown key")])
def test_bad_log_values_are_refused(item, message):
    with pytest.raises(UserError, match=message):
        load_config(SMOKE, [item])


def spy_stage():
    def run(ctx):
        (ctx.out_dir / "out.txt").write_text("done")
    return Stage("teacher", 1, "teacher", ("out.txt",), mock.Mock(side_effect=run))


def test_the_stage_gets_the_log_settings_in_its_context(tmp_path):
    config = Config()
    config.run.store, config.log.every_steps = str(tmp_path / "store"), 9
    stage = spy_stage()
    Runner(config, tmp_path / "w", log=lambda line: None, stages={"teacher": stage}).run(["teacher"])
    (ctx,), _ = stage.run.call_args
    assert ctx.live_log is config.log and ctx.live_log.every_steps == 9


def test_a_missing_package_stops_the_run_before_any_stage(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = Config()
    config.run.store, config.log.wandb = str(tmp_path / "store"), True
    stage = spy_stage()
    with pytest.raises(UserError, match=r"pip install wandb==0\.31\.0"):
        Runner(config, tmp_path / "w", log=lambda line: None, stages={"teacher": stage}).run(["teacher"])
    stage.run.assert_not_called()
    assert not list((tmp_path / "store").glob("teacher/*"))
