"""Launcher mistakes exit 2 with the fix, before anything is submitted or written."""

import pytest

from pipeline.core.errors import UserError
from pipeline.launchers.slurm import sbatch_options
from tests.conftest import SMOKE, run_cli


def _sweep(tmp_path, *args, env=None):
    return run_cli("sweep", "--config", SMOKE, "--workdir", tmp_path / "s", "--set", "mart.beta=1,6", *args,
                   check=False, env=env)


def test_missing_submitit_names_the_install_command(tmp_path):
    shadow = tmp_path / "shadow" / "submitit"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no submitit here')\n")
    proc = _sweep(tmp_path, "--launcher", "slurm", env={"PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 2 and "'rst-mart[slurm]'" in proc.stderr and "submitit==1.5.4" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "s").exists()


def test_missing_sbatch_names_the_way_to_get_one(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = _sweep(tmp_path, "--launcher", "slurm", env={"PATH": str(empty)})
    assert proc.returncode == 2 and "sbatch" in proc.stderr and "scripts/slurm_local.sh" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--jobs", "2"], "--launcher local"),
    (["--launcher", "local", "--jobs", "0"], "at least 1"),
    (["--launcher", "local", "--set", "launcher.partition=a,b"], "launcher.partition"),
])
def test_launcher_option_mistakes_exit_2(tmp_path, args, fragment):
    proc = _sweep(tmp_path, *args)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


def test_sbatch_options_become_submitit_parameters():
    assert sbatch_options(["--qos=high", "--exclusive", "--account=my-lab"]) == {
        "qos": "high", "exclusive": True, "account": "my-lab"}
    with pytest.raises(UserError, match="long sbatch option"):
        sbatch_options(["-p gpu"])
