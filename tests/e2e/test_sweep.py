"""`python -m pipeline sweep` and `gc` through the CLI on the smoke config, shrunk to seconds per variant."""
import pandas as pd

from tests.conftest import SMOKE, run_cli

TINY = ["--set", "teacher.epochs=1", "--set", "pool.limit=256", "--set", "mart.epochs=1",
        "--set", "mart.epoch_size=128", "--set", "mart.eval_n=32"]


def test_a_2x2_sweep_writes_4_rows_and_builds_one_teacher(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("sweep", "--config", SMOKE, "--workdir", sweep, *TINY, "--set", "mart.beta=1,6",
                   "--set", "mart.unsup_fraction=0.25,0.5", env={"RST_MART_STORE": ""})
    assert proc.stdout.count("teacher: ran in") == 1 and proc.stdout.count("pseudolabel: ran in") == 1
    assert proc.stdout.count("mart: ran in") == 4
    table = pd.read_csv(sweep / "sweep.csv")
    assert len(table) == 4 and {"mart.beta", "mart.unsup_fraction", "mart.clean", "mart.pgd20", "seconds",
                                "teacher_fingerprint", "mart_fingerprint"} <= set(table.columns)
    assert table["teacher_fingerprint"].nunique() == 1 and table["mart_fingerprint"].nunique() == 4
    assert table["mart.clean"].between(0, 1).all() and table["mart.pgd20"].between(0, 1).all()
    assert not [c for c in table.columns if c.startswith("plot_")]
    assert (sweep / "sweep.png").stat().st_size > 0
    assert (tmp_path / ".store" / "teacher").is_dir()  # the default store sits beside the sweep's directory

    # An interrupted or repeated sweep resumes: nothing is rebuilt.
    again = run_cli("sweep", "--config", SMOKE, "--workdir", sweep, *TINY, "--set", "mart.beta=1,6",
                    "--set", "mart.unsup_fraction=0.25,0.5", env={"RST_MART_STORE": ""})
    assert "ran in" not in again.stdout and again.stdout.count("mart: cached") == 4

    # gc: every entry is referenced by some variant's work dir, so nothing goes.
    dry = run_cli("gc", "--store", tmp_path / ".store", "--dry-run").stdout
    assert "0 unreferenced entries" in dry


def test_sweep_input_errors_exit_2_before_anything_runs(tmp_path):
    for bad, fragment in ((["--set", "mart.betta=1,2"], "mart.betta"), (["--set", "mart.beta=1,"], "empty value"),
                          (["--set", "mart.beta=1,x"], "mart.beta"), (["--seeds", "0,a"], "--seeds")):
        proc = run_cli("sweep", "--config", SMOKE, "--workdir", tmp_path / "s", *bad, check=False)
        assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


def test_gc_removes_only_unreferenced_entries(tmp_path):
    workdir = tmp_path / "w"
    common = ["--config", SMOKE, "--workdir", workdir, *TINY, "--set", "mart.unsup_fraction=0", "--stages", "mart"]
    run_cli("run", *common)
    run_cli("run", *common, "--set", "mart.beta=3")  # the first mart entry is now unreferenced
    store = tmp_path / "store"
    dry = run_cli("gc", "--store", store, "--dry-run").stdout  # used a moment ago: kept for the grace period
    assert "would remove" not in dry and "1 unreferenced entries: 1 kept, used within --keep 14d" in dry
    dry = run_cli("gc", "--store", store, "--dry-run", "--keep", "0").stdout
    assert "would remove" in dry and "1 unreferenced entries" in dry
    assert len([p for p in (store / "mart").iterdir() if p.is_dir()]) == 2
    run_cli("gc", "--store", store, "--keep", "0")
    remaining = [p for p in (store / "mart").iterdir() if p.is_dir()]
    assert remaining == [(workdir / "mart").resolve()]
    assert "mart: cached" in run_cli("run", *common, "--set", "mart.beta=3").stdout
