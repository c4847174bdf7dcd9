"""The reproduction benchmark end to end at its --quick size: every (loss, data) row, on one training budget.

No speed or accuracy-ordering assertions: at this size the numbers mean nothing.
"""
import json
import re

from benchmarks import reproduce_fashion as rf


def test_quick_run_table_and_equal_budgets(tmp_path):
    logged = []
    table, raw = rf.run(rf.QUICK, tmp_path, log=logged.append)

    assert len(table) == len(rf.LOSSES) * len(rf.DATA_SETTINGS) == 6
    assert list(table.columns) == ["loss", "data", "clean", "pgd20", "n", "seeds"]
    assert set(zip(table["loss"], table["data"])) == {(loss, data) for loss in rf.LOSSES for data in rf.DATA_SETTINGS}
    assert (table["n"] == rf.QUICK.eval_n).all() and (table["seeds"] == 1).all()
    for attack in rf.QUICK.attacks:
        assert raw[attack].between(0, 100).all(), raw[attack]
        for cell in table[attack]:  # one seed: "mean" only, in percent with one decimal
            assert re.fullmatch(r"\d{1,3}\.\d", cell) and 0 <= float(cell) <= 100, cell

    # Same training budget for every run, as recorded by the mart stage itself.
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("seed0/*/mart/stage.json"))]
    assert len(records) == 6
    budgets = {(r["params"]["mart"]["epochs"], r["params"]["mart"]["epoch_size"]) for r in records}
    assert budgets == {(rf.QUICK.epochs, rf.QUICK.epoch_size)}
    assert sorted(r["params"]["mart"]["unsup_fraction"] for r in records) == [0.0] * 3 + [0.5] * 3

    # Pool runs reuse the seed's teacher and pseudo-labels (copied in, found fresh, not retrained).
    for loss in rf.LOSSES:
        pool_run = [m for m in logged if m.startswith(f"[seed 0 {loss} + pseudo-labeled pool]")]
        assert any(m.endswith("teacher: cached") for m in pool_run), pool_run
        assert any(m.endswith("pseudolabel: cached") for m in pool_run), pool_run
    teacher_fps = {json.loads(p.read_text())["fingerprint"] for p in tmp_path.glob("seed0/*/teacher/stage.json")}
    assert len(teacher_fps) == 1
    assert set(rf.pool_gains(raw)) == set(rf.LOSSES)


def test_summary_mean_and_std_over_seeds():
    import dataclasses

    import pandas as pd

    raw = pd.DataFrame([{"seed": s, "loss": "mart", "data": d, "unsup_fraction": u, "clean": c, "pgd20": p, "n": 64,
                         "autoattack": p - 3.125, "n_autoattack": 32}
                        for s, d, u, c, p in [(0, "labels only", 0.0, 80.0, 40.0), (1, "labels only", 0.0, 82.0, 44.0),
                                              (0, "pool", 0.5, 84.0, 50.0), (1, "pool", 0.5, 86.0, 52.0)]])
    table = rf.summarize(raw, dataclasses.replace(rf.QUICK, autoattack_n=32))
    assert list(table.columns) == ["loss", "data", "clean", "pgd20", "autoattack", "n", "n_autoattack", "seeds"]
    assert table["pgd20"].tolist() == ["42.0 ± 2.8", "51.0 ± 1.4"]
    assert table["autoattack"].tolist() == ["38.9 ± 2.8", "47.9 ± 1.4"]
    assert table["seeds"].tolist() == [2, 2]
    assert rf.pool_gains(raw) == {"mart": 9.0}
