"""A third-party stage, installed as a package with an entry point in rst_mart.stages, runs, caches and
shows in `status` with its own config section, with no edit to pipeline/: the engine finds it."""
import json
import os
import shutil

import pandas as pd

from tests.conftest import ROOT, SMOKE, run_cli

# A temperature-calibration stage after mart: fits a softmax temperature to mart's model.pt on held-out
# labeled images (the remainder of the labeled split, whose labels training never saw).
PLUGIN = '''
"""calibrate: a softmax temperature for mart's model, fitted on held-out labeled images."""
from dataclasses import dataclass
from typing import ClassVar

from data.sources import LABELED
from pipeline.core.checks import at_least
from pipeline.stage import Stage


@dataclass
class CalibrateConfig:
    n: int = 256  # held-out labeled images the temperature is fitted on
    max_temperature: float = 10.0  # the largest temperature tried (200 steps from 0.05)

    RANGES: ClassVar[dict] = {"n": at_least(1, high=10**6), "max_temperature": at_least(0.1, high=1000.0)}


def run(ctx):
    import json
    import os

    import numpy as np
    import torch

    import pipeline

    cfg = ctx.config.calibrate
    split = ctx.sources["labeled"]
    rows = split.remainder_index[:cfg.n]
    images = torch.from_numpy(split.dataset.train_images[rows]).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(split.dataset.train_labels[rows])
    model = pipeline.load_model(ctx.inputs["mart"].path / "model.pt")
    with torch.inference_mode():
        logits = model(images)
    temperatures = np.linspace(0.05, cfg.max_temperature, 200)
    nll = [torch.nn.functional.cross_entropy(logits / t, labels).item() for t in temperatures]
    best = float(temperatures[int(np.argmin(nll))])
    tmp = ctx.out_dir / "temperature.json.tmp"
    tmp.write_text(json.dumps({"temperature": best, "nll": min(nll), "n": len(rows)}))
    os.replace(tmp, ctx.out_dir / "temperature.json")
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    tmp = ctx.out_dir / "results.csv.tmp"
    tmp.write_text(f"model,split,attack,eps,accuracy,n\\nmart,heldout,clean,0.0,{accuracy},{len(rows)}\\n")
    os.replace(tmp, ctx.out_dir / "results.csv")


STAGE = Stage(name="calibrate", version=1, section="calibrate", config=CalibrateConfig, run=run,
              inputs=lambda config: (LABELED, "mart"), outputs=("temperature.json", "results.csv"))
'''


def install_plugin(site):
    (site / "calib_stage").mkdir(parents=True)
    (site / "calib_stage" / "__init__.py").write_text(PLUGIN)
    info = site / "calib_stage-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: calib-stage\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rst_mart.stages]\ncalibrate = calib_stage:STAGE\n")


def test_a_plugin_stage_runs_caches_and_shows_in_status(tmp_path, smoke_workdir):
    install_plugin(tmp_path / "site")
    # The smoke run's entries (teacher, pseudolabel, mart) in a store of this test's own.
    shutil.copytree(smoke_workdir.parent / "store", tmp_path / "store",
                    ignore=shutil.ignore_patterns("*.lock", "workdirs"))
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
           "RST_MART_STORE": str(tmp_path / "store")}
    workdir = tmp_path / "w"

    def cli(*args):
        return run_cli(*args, "--config", SMOKE, "--workdir", workdir, env=env).stdout

    out = cli("run", "--stages", "calibrate", "--set", "calibrate.n=128")
    assert "mart: cached" in out and "calibrate: missing, running" in out and "calibrate: ran in" in out
    fitted = json.loads((workdir / "calibrate" / "temperature.json").read_text())
    assert fitted["n"] == 128 and 0.05 <= fitted["temperature"] <= 10.0
    results = pd.read_csv(workdir / "calibrate" / "results.csv")
    assert list(results.columns) == ["model", "split", "attack", "eps", "accuracy", "n"]
    record = json.loads((workdir / "calibrate" / "stage.json").read_text())
    assert record["params"] == {"calibrate": {"n": 128, "max_temperature": 10.0}}

    out = cli("run", "--stages", "calibrate", "--set", "calibrate.n=128")
    assert out.splitlines()[:4] == ["teacher: cached", "pseudolabel: cached", "mart: cached", "calibrate: cached"]

    status = cli("status", "--stages", "calibrate", "--set", "calibrate.n=64")
    lines = dict(line.split(": ", 1) for line in status.splitlines())
    assert all(lines[s].startswith("fresh") for s in ("teacher", "pseudolabel", "mart"))
    assert lines["calibrate"].startswith("stale, calibrate.n changed (128 -> 64)")
    out = cli("run", "--stages", "calibrate", "--set", "calibrate.n=64")
    assert "mart: cached" in out and "calibrate: stale, calibrate.n changed (128 -> 64), running" in out

    # Its section is checked like a built-in's: exit 2, one paragraph, nothing run.
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w2", "--stages", "calibrate", "--set",
                   "calibrate.n=0", env=env, check=False)
    assert proc.returncode == 2 and "`calibrate.n` is 0" in proc.stderr and not (tmp_path / "w2").exists()
    proc = run_cli("run", "--config", SMOKE, "--workdir", tmp_path / "w2", "--set", "calibrate.nn=1", env=env,
                   check=False)
    assert proc.returncode == 2 and "unknown key `calibrate.nn`" in proc.stderr
