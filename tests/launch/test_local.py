"""`sweep --launcher local --jobs 2`: variants as parallel processes, shared stages built once, same models."""
import json

import pandas as pd

from tests.launch.conftest import model_digest, sweep


def test_two_jobs_build_the_teacher_once_and_train_the_serial_models(tmp_path, serial):
    _, reference = serial
    out = tmp_path / "sweep"
    proc = sweep("--workdir", out, "--set", "mart.beta=1,6", "--set", "mart.unsup_fraction=0.25",
                 "--launcher", "local", "--jobs", "2")
    # One shared-stages job built teacher and pseudolabel; both variants found them cached.
    assert proc.stdout.count("teacher: ran in") == 1 and proc.stdout.count("pseudolabel: ran in") == 1, proc.stdout
    assert proc.stdout.count("teacher: cached") == 2 and proc.stdout.count("mart: ran in") == 2
    assert "2 at a time" in proc.stdout
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 2 and table["teacher_fingerprint"].nunique() == 1
    for name in ("mart.beta=1", "mart.beta=6"):
        serial_name = f"{name},mart.unsup_fraction=0.25"
        assert model_digest(out / name) == reference[serial_name], name
    record = json.loads((out / "launch.json").read_text())
    assert {j["exit"] for j in record["jobs"].values()} == {0} and len(record["jobs"]) == 3

    # The same sweep again launches nothing: every variant is done in the store.
    again = sweep("--workdir", out, "--set", "mart.beta=1,6", "--set", "mart.unsup_fraction=0.25",
                  "--launcher", "local", "--jobs", "2")
    assert again.stdout.count("done (every stage fresh in the store)") == 2 and "ran in" not in again.stdout


def test_a_failed_job_is_named_with_its_log_and_sets_the_exit_status(tmp_path):
    # A teacher checkpoint that is not one: planning only hashes the file, the job's run exits 2 on reading it.
    bad = tmp_path / "teacher.pt"
    bad.write_text("not a checkpoint")
    out = tmp_path / "sweep"
    args = ["--workdir", out, "--set", f"teacher.checkpoint={bad}", "--set", "mart.beta=1,6"]
    proc = sweep(*args, "--launcher", "local", "--jobs", "2", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    paragraph = " ".join(proc.stdout[proc.stdout.index("FAILED: exit 2"):].split())  # the run's lines are wrapped
    assert str(out / "logs") in paragraph and f"Checkpoint {bad} could not be read" in paragraph
    assert proc.stdout.count("not started, because the shared-stages job it needs failed") == 2
    assert not (out / "mart.beta=1" / "mart").exists()
    status = sweep(*args, "--status", check=False)
    assert status.returncode == 1 and "FAILED: exit 2" in status.stdout, status.stdout
    assert f"Checkpoint {bad} could not be read" in " ".join(status.stdout.split())
