"""A work dir remembers its config: after `run` with --set flags, `status` and `report` given only the
--workdir plan with the recorded config (every stage fresh, the eval section shown), and say so when
another --config is given. The report counts each pool image once."""
from pipeline.workdir_record import RECORD_NAME
from tests.conftest import SMOKE, run_cli
from tests.pipeline.test_report import Page

POOL = 256
SETS = ["--set", "teacher.epochs=1", "--set", f"pool.limit={POOL}", "--set", "mart.epochs=1", "--set",
        "mart.epoch_size=128", "--set", "mart.eval_n=32", "--set", "eval.attacks=clean,fgsm", "--set", "eval.n=32",
        "--set", "eval.sweep=1.0", "--set", "eval.checks=false"]
STAGES = ("teacher", "pseudolabel", "mart", "eval")


def test_status_and_report_use_the_recorded_config(tmp_path):
    workdir = tmp_path / "w"
    run_cli("run", "--config", SMOKE, "--workdir", workdir, "--stages", "mart,eval", *SETS)
    assert (workdir / RECORD_NAME).is_file()

    status = run_cli("status", "--workdir", workdir, "--stages", "mart,eval").stdout
    assert f"using the config recorded in {workdir / RECORD_NAME}" in status
    assert [line.split()[1] for line in status.splitlines() if line.startswith(STAGES)] == ["fresh"] * 4

    report = run_cli("report", "--workdir", workdir).stdout
    assert "using the config recorded" in report
    page = Page((workdir / "report.html").read_text())
    assert [h for h in page.headings if h in STAGES] == list(STAGES)  # eval included, no --set retyped
    states = {row["stage"]: row["state"] for row in page.table_with("stage")}
    assert states == dict.fromkeys(STAGES, "fresh")
    text = page.all_text
    assert f"{POOL:,} pseudo-labeled pool images" in text
    assert f"({POOL:,} images)" in text  # the accuracy counts each pool image once (not with quality.csv's "all")

    # Another config: both commands say what they compare against, and the stages are stale against it.
    other = run_cli("status", "--config", SMOKE, "--workdir", workdir).stdout
    assert f"comparing against {SMOKE}, not the config recorded in {workdir / RECORD_NAME}" in other
    assert "teacher: stale, teacher.epochs changed (1 -> 2)" in other
    report = run_cli("report", "--config", SMOKE, "--workdir", workdir).stdout
    assert f"comparing against {SMOKE}" in report
    assert f"comparing against {SMOKE}" in Page((workdir / "report.html").read_text()).all_text
