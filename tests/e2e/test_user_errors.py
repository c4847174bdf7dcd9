"""Bad input through the CLI: exit status 2, one paragraph naming the problem, no traceback, no artifact."""

import pytest

from tests.conftest import SMOKE, run_cli, small_disk


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    text = " ".join(proc.stderr.split())  # the paragraph is wrapped at 100 columns
    for fragment in fragments:
        assert fragment in text


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


@pytest.mark.parametrize("override, fragment", [
    ('mart.milestones=[1.5,"x"]', "`mart.milestones` must be a list of int"),
    ("eval.sweep=a,b", "`eval.sweep` must be a list of float"),
    ("mart.epsilon=-1", "`mart.epsilon` is -1.0"),
    ("mart.val_size=500", "smaller than the 500 labeled images"),  # smoke: data.num_labeled = 500
    ("mart.schedule=piecewise", "needs `mart.milestones`"),
    ("eval.attacks=clean,pgd", "'pgd' is not an attack"),
])
def test_bad_values_fail_before_any_stage(tmp_path, override, fragment):
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", "--set", override, check=False)
    assert_user_error(proc, fragment)
    assert not (tmp_path / "w").exists()


def test_batch_not_divisible_by_the_world_size(tmp_path):
    # What torchrun sets; the check runs before any process group is joined.
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", check=False, env={"WORLD_SIZE": "3"})
    assert_user_error(proc, "`teacher.batch_size` is 64", "multiple of 3")
    assert not (tmp_path / "w").exists()


def test_unreadable_config_files(tmp_path):
    assert_user_error(run_cli("status", "--config", tmp_path, check=False), f"config file {tmp_path} is a directory")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("# r\xe9sum\xe9\n[mart]\nbeta = 3\n".encode("latin-1"))
    assert_user_error(run_cli("status", "--config", latin1, check=False), "is not UTF-8 text")


@pytest.mark.parametrize("error, fragment", [
    (OSError(28, "No space left on device"), "no space left on the device"),
    (PermissionError(13, "Permission denied", "/shared/runs/teacher.partial"),
     "using /shared/runs/teacher.partial failed: permission denied"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "the write failed"),
])
def test_storage_errors_escaping_a_stage_exit_2(tmp_path, monkeypatch, capsys, error, fragment):
    from pipeline import cli

    def failing_dispatch(args):
        raise error

    monkeypatch.setattr(cli, "_dispatch", failing_dispatch)
    assert cli.main(["run", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    words = " ".join(err.split())  # the paragraph is wrapped where the path's length puts the breaks
    assert err.startswith("error: ") and "Traceback" not in err and fragment in words
    assert "free of" in words and "rerun the same command" in words


def test_other_errors_are_still_bugs(monkeypatch, capsys):
    from pipeline import cli

    def failing_dispatch(args):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(cli, "_dispatch", failing_dispatch)
    assert cli.main(["run"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_full_disk_during_the_teacher_then_a_rerun_completes(tmp_path):
    """A real full disk (a 64 KiB tmpfs: the first checkpoint does not fit): exit 2 with the paragraph, no
    temporary file left; after more space, the same command completes. Needs root to mount the tmpfs."""
    disk = tmp_path / "disk"
    with small_disk(disk, "64k") as grow:
        args = ("run", "--config", SMOKE, "--stages", "teacher", "--workdir", disk / "run")
        env = {"OMP_NUM_THREADS": "1", "RST_MART_STORE": str(disk / "store")}
        full = run_cli(*args, check=False, env=env)
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
        message = " ".join(full.stderr[full.stderr.rindex("error: "):].split())  # after the progress bars
        for fragment in (f"{disk / 'store'}/teacher/", ".partial/", "failed: no space left on the device",
                         "free of 64.0 KiB", "rerun the same command"):
            assert fragment in message
        assert not [p for p in (disk / "run").rglob("*.tmp")]
        grow("16m")
        run_cli(*args, env=env)
        assert (disk / "run" / "teacher" / "model.pt").exists()


@pytest.mark.parametrize("override, fragment", [
    ("run.seed=99999999999999999999999", "`run.seed` is 99999999999999999999999"),
    ("run.num_workers=1000", "`run.num_workers` is 1000"),
    ("pool.limit=99999999999999999999999", "`pool.limit` is 99999999999999999999999"),
    ("pool.path=pool.npz", "pool.path is set too, and would be ignored"),  # smoke's provider: labeled-remainder
])
def test_engine_values_are_refused_before_anything_is_created(tmp_path, override, fragment):
    for command in ("run", "status"):
        proc = run_cli(command, "--config", SMOKE, "--workdir", tmp_path / "w", "--set", override, check=False)
        assert_user_error(proc, fragment)
    assert list(tmp_path.iterdir()) == []  # no work dir, no store (RST_MART_STORE is tmp_path/store)


def test_a_work_dir_that_is_a_file_is_refused(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for command in ("run", "status", "report"):
        assert_user_error(run_cli(command, "--config", SMOKE, "--workdir", file, check=False),
                          f"the work dir {file} is a file")
    assert_user_error(run_cli("run", "--config", SMOKE, "--workdir", file / "w", check=False),
                      f"the work dir {file / 'w'} is inside {file}, which is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and file.read_text() == "mine"


def test_a_cuda_device_this_machine_lacks_is_refused_before_anything_is_created(tmp_path):
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0  # cuda:count never exists
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", "--set", f"run.device=cuda:{count}",
                   check=False)
    assert_user_error(proc, f"`run.device` is 'cuda:{count}', but this machine has", "--set run.device=auto")
    assert list(tmp_path.iterdir()) == []
    # status plans without the device (a login node may lack the run's GPUs)
    assert run_cli("status", "--config", SMOKE, "--workdir", tmp_path / "w", "--set", f"run.device=cuda:{count}",
                   check=False).returncode == 0
