"""The work dir's config record: `dump_config` round-trips through `load_config`, and `choose_config`
takes the record when no --config/--set is given and says when it compares against another config."""
import tomllib

import pytest

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.workdir_record import RECORD_NAME, choose_config, dump_config, record_config
from tests.conftest import SMOKE

# Lists, a list of lists, a float in exponent form, a provider's own [pool] key, quotes and non-ASCII.
OVERRIDES = ["mart.milestones=[1]", "mart.schedule=piecewise", "mart.weight_decay=1e-05", "eval.attacks=clean,fgsm",
             "teacher.input_normalization=[[0.5],[0.25]]", "pool.provider=npz", "pool.path=pool.npz",
             "pool.image_key=x_unlabeled",
             'data.root=/tmp/d "quoted" \u00e9t\u00e9 \U0001F600']


def test_dump_round_trips_through_load_config(tmp_path):
    config = load_config(SMOKE, OVERRIDES)
    path = record_config(tmp_path, config)
    assert path == tmp_path / RECORD_NAME
    text = path.read_text()
    tomllib.loads(text)  # valid TOML
    assert load_config(path) == config
    assert dump_config(load_config(path)) == dump_config(config)
    assert "[mart]" in text and 'image_key = "x_unlabeled"' in text
    assert [p.name for p in tmp_path.iterdir()] == [RECORD_NAME]  # written under a temp name, renamed


def test_choose_config_prefers_the_record_only_without_config_or_set(tmp_path):
    config, note = choose_config(None, [], tmp_path)
    assert note == "" and config == load_config(None)  # no record: the default config

    recorded = load_config(SMOKE, ["mart.beta=3"])
    record_config(tmp_path, recorded)
    config, note = choose_config(None, [], tmp_path)
    assert config == recorded and note == f"using the config recorded in {tmp_path / RECORD_NAME}"

    config, note = choose_config(SMOKE, ["mart.beta=3"], tmp_path)  # the same config: nothing to say
    assert config == recorded and note == ""

    config, note = choose_config(SMOKE, [], tmp_path)
    assert config.mart.beta == load_config(SMOKE).mart.beta != 3
    assert note.startswith(f"comparing against {SMOKE}, not the config recorded in {tmp_path / RECORD_NAME}")

    config, note = choose_config(None, [], tmp_path, use_record=False)  # `run`: what was typed, said to differ
    assert config == load_config(None) and note.startswith("running ") and "replaces" in note

    (tmp_path / RECORD_NAME).write_text("[mart]\nbetta = 1\n")  # e.g. a key a later version renamed
    config, note = choose_config(SMOKE, [], tmp_path)
    assert "cannot be read" in note
    with pytest.raises(UserError, match="config `run` recorded in the work dir"):
        choose_config(None, [], tmp_path)  # nothing else asked for: the damaged record is the error
