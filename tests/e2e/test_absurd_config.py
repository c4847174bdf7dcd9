"""Absurd config input through the CLI (issue 28.5): nesting no config needs, NUL bytes where paths go,
and -0.0: exit 2 with one paragraph, no traceback, nothing created."""
import pytest

from pipeline.config import load_config
from pipeline.core.fingerprint import fingerprint
from pipeline.stage_registry import stages
from tests.conftest import SMOKE, run_cli
from tests.e2e.test_user_errors import assert_user_error

DEEP = 60_000  # brackets: a command-line argument holds at most 128 KiB


@pytest.mark.parametrize("command", ["run", "status"])
def test_a_config_file_nested_100000_deep_is_refused(tmp_path, command):
    config = tmp_path / "deep.toml"
    config.write_text("[mart]\nmilestones = " + "[" * 100_000 + "]" * 100_000 + "\n")
    proc = run_cli(command, "--config", config, "--workdir", tmp_path / "w", check=False, timeout=120)
    assert_user_error(proc, f"config file {config} nests lists or tables thousands of levels deep")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("depth, fragment", [(DEEP, "thousands of levels deep"),
                                             (40, "`mart.milestones` nests lists or tables more than 32")])
def test_a_set_value_nested_too_deep_is_refused(tmp_path, depth, fragment):
    value = "[" * depth + "]" * depth
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", "--set", f"mart.milestones={value}",
                   check=False, timeout=120)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", ["run", "status"])
@pytest.mark.parametrize("where", ["file", "--set"])
def test_a_nul_byte_in_run_store_is_refused(tmp_path, command, where):
    if where == "file":
        config = tmp_path / "nul.toml"
        config.write_text(SMOKE.read_text().replace("[run]", '[run]\nstore = "st\\u0000ore"', 1))
        args = ["--config", config]
    else:
        args = ["--config", SMOKE, "--set", 'run.store="st\\u0000ore"']
    proc = run_cli(command, *args, "--workdir", tmp_path / "w", check=False, timeout=120)
    assert_user_error(proc, "`run.store` holds a NUL byte")
    assert not (tmp_path / "w").exists()


def test_minus_zero_and_zero_give_one_fingerprint():
    mart = stages()["mart"]
    prints = {fingerprint(mart.params(load_config(SMOKE, [f"mart.beta={beta}"]))) for beta in ("-0.0", "0.0", "0")}
    assert len(prints) == 1
    assert fingerprint({"eps": [-0.0, {"x": -0.0}]}) == fingerprint({"eps": [0.0, {"x": 0.0}]})
    assert fingerprint({"beta": -0.5}) != fingerprint({"beta": 0.5})  # only zero's sign is dropped
