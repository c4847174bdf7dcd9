"""sweep.csv's columns come from what each stage contributes (`Stage.results`), named `<stage>.<metric>`;
the metrics a stage puts on an axis are what sweep.png plots, and never a column themselves."""
import json
from types import SimpleNamespace

import pandas as pd

from pipeline import sweep_grid
from pipeline.stage import Stage


def finished(tmp_path, name: str, fingerprint: str, results=None):
    entry = tmp_path / name / fingerprint
    entry.mkdir(parents=True)
    (entry / "stage.json").write_text(json.dumps({"seconds": 2.5}))
    stage = Stage(name=name, version=1, section=name, outputs=(), run=lambda ctx: None, results=results)
    return SimpleNamespace(stage=stage, entry=entry, fingerprint=fingerprint * 64)


def test_rows_ask_the_stages_and_the_plot_uses_their_axes(tmp_path):
    def trained(entry):  # a stage's own metric names, with the value read from its entry
        value = float((entry / "acc.txt").read_text())
        return [{"metric": "clean", "value": value, "axis": "x"}, {"metric": "robust", "value": value / 2, "axis": "y"},
                {"metric": "last.clean", "value": 0.5}]

    rows = []
    for beta, value in (("1", 0.8), ("6", 0.6)):
        plans = [finished(tmp_path / beta, "prep", "a"), finished(tmp_path / beta, "train", "b", results=trained)]
        (plans[1].entry / "acc.txt").write_text(str(value))
        rows.append(sweep_grid._row([f"train.beta={beta}"], ["train.beta"], f"train.beta={beta}", plans))
    sweep_grid.write_table(tmp_path, rows, ["train.beta"])
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert list(table.columns) == ["variant", "train.beta", "prep_fingerprint", "train_fingerprint", "seconds",
                                   "train.clean", "train.robust", "train.last.clean"]
    assert table["train.clean"].tolist() == [0.8, 0.6] and table["train.robust"].tolist() == [0.4, 0.3]
    assert table["seconds"].tolist() == [5.0, 5.0]
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_no_axes_no_plot(tmp_path):
    plans = [finished(tmp_path, "prep", "a", results=lambda entry: [{"metric": "n", "value": 3}])]
    sweep_grid.write_table(tmp_path, [sweep_grid._row([], [], "base", plans)], [])
    assert pd.read_csv(tmp_path / "sweep.csv")["prep.n"].tolist() == [3]
    assert not (tmp_path / "sweep.png").exists()
