"""Bring your own teacher: `teacher.checkpoint` imports a classifier instead of training one."""
import json

import pandas as pd
import torch

from ml.checkpoints import save_model
from ml.models import build_model
from tests.conftest import SMOKE, run_cli


def test_an_imported_teacher_is_scored_cached_by_digest_and_refreshed_when_the_file_changes(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "teacher.pt"
    torch.save(build_model("tiny-cnn", num_classes=10, in_channels=1).state_dict(), weights)  # a plain state dict
    args = ["run", "--config", SMOKE, "--workdir", tmp_path / "w", "--stages", "teacher",
            "--set", f"teacher.checkpoint={weights}", "--set", "teacher.arch=tiny-cnn"]
    first = run_cli(*args).stdout
    assert "teacher: missing, running" in first and "epoch 1/" not in first  # imported, not trained
    record = json.loads((tmp_path / "w" / "teacher" / "stage.json").read_text())
    assert "teacher_checkpoint" in record["inputs"]
    results = pd.read_csv(tmp_path / "w" / "teacher" / "results.csv")
    assert results["n"].tolist() == [10000] and results["accuracy"].between(0, 1).all()
    assert len(pd.read_csv(tmp_path / "w" / "teacher" / "metrics.csv")) == 0
    imported = torch.load(tmp_path / "w" / "teacher" / "model.pt", weights_only=True)
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(imported["state_dict"][k], v) for k, v in saved.items() if k.startswith("net."))

    assert "teacher: cached" in run_cli(*args).stdout
    torch.save(build_model("tiny-cnn", num_classes=10, in_channels=1).state_dict(), weights)  # new weights
    assert "teacher: stale, input teacher_checkpoint changed, running" in run_cli(*args).stdout


def test_a_checkpoint_that_does_not_fit_is_a_user_error(tmp_path):
    wrong = tmp_path / "wrong.pt"
    save_model(wrong, build_model("tiny-cnn", num_classes=3, in_channels=1), arch="tiny-cnn", num_classes=3,
               in_channels=1, mean=[0.5], std=[0.25])
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w", "--stages", "teacher",
                   "--set", f"teacher.checkpoint={wrong}", "--set", "teacher.arch=tiny-cnn", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(wrong) in proc.stderr, proc.stderr
    assert not (tmp_path / "w" / "teacher").exists()
