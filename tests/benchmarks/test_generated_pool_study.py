"""The generated-pool study end to end at its --quick size: three data settings x two budgets through sweeps
that share one store; the table and the labelling rows are read from the stages' own files.

No accuracy-ordering assertions: at this size the numbers mean nothing.
"""
import json
import re

import pandas as pd

from benchmarks import generated_pool_study as study
from pipeline.store import STORE_ENV


def test_quick_study_rows_table_and_shared_stages(tmp_path, monkeypatch):
    monkeypatch.delenv(STORE_ENV, raising=False)  # the store is <workdir>/.store, beside the sweeps
    raw = study.run(study.QUICK, tmp_path, log=lambda line: None)

    budgets = [e * study.QUICK.epoch_size for e in study.QUICK.epochs]
    assert sorted(zip(raw["examples"], raw["setting"])) == sorted((b, s) for b in budgets for s in study.SETTINGS)
    for attack in study.ATTACKS:
        assert raw[attack].between(0, 100).all(), raw[attack]
    assert (raw["n"] == study.QUICK.eval_n).all()

    # Each row's mart stage recorded the data setting and budget the row claims.
    for row in raw.to_dict("records"):
        slug = study.SETTINGS[row["setting"]][2]
        record = json.loads((tmp_path / f"{slug}-e{row['epochs']}" / "base" / "mart" / "stage.json").read_text())
        assert record["params"]["mart"]["unsup_fraction"] == study.SETTINGS[row["setting"]][1]
        assert record["params"]["mart"]["epochs"] * record["params"]["mart"]["epoch_size"] == row["examples"]

    # The pool rows carry the teacher's agreement with the pool's own labels, read from quality.csv.
    pools = raw[raw["setting"] != "labels only"]
    assert pools["pool_agreement"].between(0, 100).all()
    assert set(pools.loc[pools["setting"] == "generated pool", "pool_images"]) == {study.QUICK.generated}
    labeling = study.labeling_table(raw)
    assert list(labeling.columns) == ["seed", "agreement on generated pool (%)", "agreement on real pool (%)",
                                      "teacher on real test (%)"]
    generated_dir = tmp_path / f"generated-e{study.QUICK.epochs[0]}" / "base" / "pseudolabel"
    total = pd.read_csv(generated_dir / "quality.csv").set_index("class").loc["all"]
    assert total["measured_against"] == "conditioning classes"
    assert labeling["agreement on generated pool (%)"].iloc[0] == 100.0 * total["precision"]

    table = study.summarize(raw)
    assert len(table) == len(budgets) * len(study.SETTINGS) and (table["seeds"] == 1).all()
    assert all(re.fullmatch(r"\d{1,3}\.\d", cell) for cell in table["pgd20"])

    study.plot(raw, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One teacher, one generator and one generated pool for the seed, shared by every sweep that needs them.
    store = tmp_path / ".store"
    for stage in ("teacher", "diffusion", "generate"):
        assert len([p for p in (store / stage).iterdir() if p.is_dir() and "." not in p.name]) == 1, stage


def test_settings_option_runs_only_the_chosen_settings(tmp_path, monkeypatch):
    # How one more budget is added to a study for one setting: nothing else is trained, not even the generator.
    monkeypatch.delenv(STORE_ENV, raising=False)
    out = tmp_path / "rows.csv"
    assert study.main(["--quick", "--settings", "real", "--epochs", "1", "--workdir", str(tmp_path),
                       "--out", str(out)]) == 0

    rows = pd.read_csv(out)
    assert list(rows["setting"]) == ["real pool"] and list(rows["epochs"]) == [1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["real-e1"]
    assert not (tmp_path / ".store" / "diffusion").exists() and not (tmp_path / ".store" / "generate").exists()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
