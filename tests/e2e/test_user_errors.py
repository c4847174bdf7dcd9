"""Bad input through the CLI: exit status 2, one paragraph naming the problem, no traceback, no artifact."""
import pytest

from tests.conftest import SMOKE, run_cli


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in proc.stderr


@pytest.mark.parametrize("override, fragment", [
    ("mart.betaa=1", "mart.betaa"),
    ("teacher.epochs=many", "teacher.epochs"),
])
def test_bad_config_keys(tmp_path, override, fragment):
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path, "--set", override, check=False)
    assert_user_error(proc, fragment)
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset(tmp_path):
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", "--set", "data.dataset=cifar10",
                   "--set", f"data.root={tmp_path / 'nowhere'}", check=False)
    assert_user_error(proc, str(tmp_path / "nowhere"))
    assert not (tmp_path / "w").exists()


def test_bad_pool_fails_before_the_teacher_trains(tmp_path):
    bad = tmp_path / "pool.npz"
    bad.write_bytes(b"this is not a zip file")
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", "--set", "pool.provider=npz",
                   "--set", f"pool.path={bad}", check=False)
    assert_user_error(proc, str(bad))
    assert not (tmp_path / "w" / "teacher").exists() and not (tmp_path / "w" / "teacher.partial").exists()


def test_unknown_stage(tmp_path):
    assert_user_error(run_cli("run", "--config", SMOKE, "--workdir", tmp_path, "--stages", "mrat", check=False),
                      "unknown stage mrat")
