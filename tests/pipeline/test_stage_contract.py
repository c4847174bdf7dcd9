"""A stage sees its own section and the keys it declares; everything it declares (less the insignificant)
is in its fingerprint, so changing any setting it reads makes it stale."""
import dataclasses
from unittest import mock

import pytest

from pipeline import stage_registry
from pipeline.config import Config
from pipeline.runner import Runner
from stages import eval as eval_stage


def test_a_stage_reads_its_section_and_declared_keys_only():
    view = eval_stage.STAGE.view(Config())
    assert view.eval.n == 1000 and view.mart.arch == "small-cnn" and view.run.seed == 0 and view.run.device == "auto"
    with pytest.raises(AttributeError, match=r"stage eval reads `run.compile`, which it does not declare; add "
                                             r"\"run.compile\" to its Stage\(reads=...\)"):
        view.run.compile
    with pytest.raises(AttributeError, match=r"stage eval reads `mart.beta`, which it does not declare"):
        view.mart.beta
    with pytest.raises(AttributeError, match=r"stage eval reads the config section \[data\], which it does not "):
        view.data


def test_every_declared_read_names_an_existing_key():
    config = Config()
    for stage in stage_registry.stages().values():
        for dotted in stage.reads:
            section, key = dotted.split(".")
            assert key == "*" or key in config.section(section), f"{stage.name} declares {dotted}, which does not exist"
        assert set(stage.insignificant) <= set(stage.reads) | set(config.section(stage.section)), stage.name


def test_a_stage_may_read_a_whole_section():
    stage = dataclasses.replace(eval_stage.STAGE, reads=("run.*", "data.num_labeled"), insignificant=("run.*",))
    view = stage.view(Config())
    assert view.run.compile is False and view.data.num_labeled == 4000
    assert set(stage.params(Config())) == {"eval", "data.num_labeled"}
    assert dataclasses.replace(stage, insignificant=()).params(Config())["run.*"]["seed"] == 0


@pytest.mark.parametrize("key, value", [("mart.arch", "tiny-cnn"), ("run.seed", 7)])
def test_eval_of_a_checkpoint_file_is_stale_when_a_setting_it_reads_changes(tmp_path, key, value):
    checkpoint = tmp_path / "theirs.pt"
    checkpoint.write_bytes(b"weights")  # the spy never loads it; its digest is eval's input
    spy = mock.Mock(side_effect=lambda ctx: [(ctx.out_dir / name).write_text("x") for name in eval_stage.OUTPUTS])
    stage = dataclasses.replace(eval_stage.STAGE, run=spy,
                                inputs=lambda config: (eval_stage.checkpoint_source(str(checkpoint)),))

    def runner(**changes):
        config = Config()
        config.eval.models = [str(checkpoint)]
        config.run.store = str(tmp_path / "store")
        for dotted, v in changes.items():
            section, name = dotted.split(".")
            setattr(getattr(config, section), name, v)
        lines = []
        return Runner(config, tmp_path / "w", log=lines.append, stages={"eval": stage}), lines

    runner()[0].run(["eval"])
    assert runner()[0].plan(["eval"])[0].fresh
    changed, lines = runner(**{key: value})
    (plan,) = changed.plan(["eval"])
    assert not plan.fresh and f"{key} changed" in plan.reason
    # device and channels_last are read but insignificant: they leave eval fresh
    assert runner(**{"run.device": "cpu", "run.channels_last": True})[0].plan(["eval"])[0].fresh
