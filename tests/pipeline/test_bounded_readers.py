"""Every reader of a file inside a stage entry is bounded and regular-file-only (issue 28.3): report,
results (run's table, sweep rows), sweep's stage.json, export. Each is tried on a FIFO, a symlink to
/dev/zero and an oversized (sparse) file, in a real process with a timeout: a reader that blocked on
the FIFO or read /dev/zero to the end would fail the test by its timeout, not hang the suite."""
import json
import os
import subprocess
import sys

import pytest

from stages.reporting import PNG_LIMIT_BYTES, TABLE_LIMIT_BYTES
from tests.conftest import ROOT, run_cli
from tests.pipeline.test_report import Page, full_workdir  # noqa: F401 (a fixture)

KINDS = ["fifo", "/dev/zero", "oversized"]


def damage(path, kind, limit):
    """Replace `path` by a FIFO, a symlink to /dev/zero, or a sparse file one byte over `limit`."""
    if os.path.lexists(path):
        os.unlink(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        os.symlink("/dev/zero", path)
    else:
        with open(path, "wb") as f:
            f.truncate(limit + 1)  # sparse: no disk, no time


def python(code, timeout=60):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("kind", KINDS)
def test_report_notes_each_damaged_file_and_finishes(full_workdir, kind):  # noqa: F811
    damaged = {("teacher", "metrics.csv"): TABLE_LIMIT_BYTES, ("mart", "results.csv"): TABLE_LIMIT_BYTES,
               ("pseudolabel", "quality.csv"): TABLE_LIMIT_BYTES, ("eval", "robustness.png"): PNG_LIMIT_BYTES,
               ("eval", "checks.csv"): TABLE_LIMIT_BYTES}
    if kind != "oversized":  # h5py reads a pool file in blocks; a FIFO or a device it must not even open
        damaged[("pseudolabel", "pseudolabels.h5")] = 0
    for (stage, name), limit in damaged.items():
        damage(full_workdir / stage / name, kind, limit)
    proc = run_cli("report", "--workdir", full_workdir, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = Page((full_workdir / "report.html").read_text()).all_text
    why = {"fifo": "it is a FIFO (named pipe), not a regular file",
           "/dev/zero": "it is a symbolic link, not a regular file"}.get(kind)
    for (stage, name) in damaged:
        if name == "pseudolabels.h5":
            assert "pseudolabels.h5 could not be read (NotRegularFile" in text
        elif name == "quality.csv":  # the section falls back to results.csv's per-class rows
            assert "from the per-class rows of results.csv" in text
        else:
            limit = damaged[(stage, name)]
            expected = (f"it holds {limit + 1} bytes or more, over the {limit >> 20} MiB limit"
                        if kind == "oversized" else why)
            assert f"{name} could not be read ({expected})" in text, name
    assert "fgsm" in text  # the undamaged eval results.csv still shows


@pytest.mark.parametrize("kind", KINDS)
def test_results_rows_refuse_a_damaged_results_csv_with_a_user_error(tmp_path, kind):
    entry = tmp_path / "store" / "teacher" / ("a" * 64)
    entry.mkdir(parents=True)
    damage(entry / "results.csv", kind, TABLE_LIMIT_BYTES)
    proc = python(f"from pipeline.core.errors import UserError\nfrom stages.teacher import results\n"
                  f"try:\n    results(__import__('pathlib').Path({str(entry)!r}))\n"
                  f"except UserError as e:\n    print('USER', e)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"USER {entry / 'results.csv'} cannot be read as a results table")
    assert "python -m pipeline run --stages teacher --force" in proc.stdout


@pytest.mark.parametrize("kind", KINDS)
def test_a_sweep_row_refuses_a_damaged_stage_json(tmp_path, kind):
    entry = tmp_path / "store" / "teacher" / ("a" * 64)
    entry.mkdir(parents=True)
    damage(entry / "stage.json", kind, 1 << 20)
    code = (f"from pathlib import Path\nfrom types import SimpleNamespace as NS\n"
            f"from pipeline.core.errors import UserError\nfrom pipeline.sweep_grid import _row\n"
            f"plan = NS(entry=Path({str(entry)!r}), fingerprint='a' * 64, stage=NS(name='teacher', results=None))\n"
            f"try:\n    _row(['run.seed=0'], [], 'base', [plan])\nexcept UserError as e:\n    print('USER', e)\n")
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"USER {entry / 'stage.json'} cannot be read")


@pytest.mark.parametrize("kind", KINDS)
def test_export_refuses_a_model_pt_that_is_not_one(tmp_path, kind):
    from ml.checkpoints import EXPORT_LIMIT_BYTES

    model_pt = tmp_path / "model.pt"
    damage(model_pt, kind, EXPORT_LIMIT_BYTES)
    proc = run_cli("export", model_pt, "-o", tmp_path / "out.pt", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    message = " ".join(proc.stderr.split())
    assert {"fifo": "is a FIFO (named pipe), not a regular file", "/dev/zero": "is a character device, not a regular",
            "oversized": "over the 8 GiB a model.pt can reach"}[kind] in message
    assert not (tmp_path / "out.pt").exists()


def test_a_stage_record_read_by_the_report_is_bounded_too(full_workdir):  # noqa: F811
    damage(full_workdir / "mart" / "stage.json", "/dev/zero", 0)
    proc = run_cli("report", "--workdir", full_workdir, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((full_workdir / "teacher" / "stage.json").read_text())["stage"] == "teacher"
