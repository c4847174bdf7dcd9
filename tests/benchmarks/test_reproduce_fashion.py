"""The reproduction benchmark end to end at its --quick size: every (loss, data) row, on one training budget,
through two sweeps that share one stage store.

No speed or accuracy-ordering assertions: at this size the numbers mean nothing.
"""
import json
import re
from pathlib import Path

import pandas as pd

from benchmarks import reproduce_fashion as rf
from pipeline.store import STORE_ENV

COMMITTED_CSV = Path(rf.__file__).with_name("reproduce_fashion.csv")


def _entries(store: Path, stage: str) -> list[Path]:
    """Finished entries of a stage (not .partial, .lock or .old siblings)."""
    return [p for p in (store / stage).iterdir() if p.is_dir() and "." not in p.name]


def test_quick_run_table_shared_stages_and_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(STORE_ENV, raising=False)  # the store is <workdir>/.store, beside both sweeps
    logged = []
    table, raw = rf.run(rf.QUICK, tmp_path, log=logged.append)

    assert len(table) == len(rf.LOSSES) * len(rf.DATA_SETTINGS) == 6
    assert list(table.columns) == ["loss", "data", "clean", "pgd20", "autoattack-fast", "n", "n_autoattack", "seeds"]
    assert set(zip(table["loss"], table["data"])) == {(loss, data) for loss in rf.LOSSES for data in rf.DATA_SETTINGS}
    assert (table["n"] == rf.QUICK.eval_n).all() and (table["n_autoattack"] == rf.QUICK.autoattack_n).all()
    assert (table["seeds"] == 1).all()
    for attack in rf.attack_columns(rf.QUICK):
        assert raw[attack].between(0, 100).all(), raw[attack]
        for cell in table[attack]:  # one seed: "mean" only, in percent with one decimal
            assert re.fullmatch(r"\d{1,3}\.\d", cell) and 0 <= float(cell) <= 100, cell
    assert set(rf.pool_gains(raw)) == set(rf.LOSSES)

    # Each variant's eval wrote its own results.csv (accuracy a fraction) and the table is read from it.
    for sweep, attacks, n in ((rf.ATTACKS_SWEEP, rf.QUICK.attacks, rf.QUICK.eval_n),
                              (rf.AUTOATTACK_SWEEP, (rf.QUICK.autoattack,), rf.QUICK.autoattack_n)):
        variants = pd.read_csv(tmp_path / sweep / "sweep.csv")["variant"]
        assert len(variants) == 6
        for variant in variants:
            results = pd.read_csv(tmp_path / sweep / variant / "eval" / "results.csv")
            headline = results[results["attack"].isin(attacks)]
            assert sorted(headline["attack"]) == sorted(attacks) and (headline["n"] == n).all()
            assert results["accuracy"].between(0, 1).all(), results

    # Same training budget for every run, as recorded by the mart stage itself.
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / rf.ATTACKS_SWEEP).glob("*/mart/stage.json"))]
    assert len(records) == 6
    budgets = {(r["params"]["mart"]["epochs"], r["params"]["mart"]["epoch_size"]) for r in records}
    assert budgets == {(rf.QUICK.epochs, rf.QUICK.epoch_size)}
    assert sorted(r["params"]["mart"]["unsup_fraction"] for r in records) == [0.0] * 3 + [0.5] * 3

    # Shared by construction: one teacher and one pseudo-label set (one seed), six MART models that the
    # AutoAttack sweep reuses, and an eval per variant per sweep. Each was built exactly once.
    store = tmp_path / ".store"
    built = {stage: len(_entries(store, stage)) for stage in ("teacher", "pseudolabel", "mart", "eval")}
    assert built == {"teacher": 1, "pseudolabel": 1, "mart": 6, "eval": 12}
    ran = {stage: sum(m.startswith(f"{stage}: ran in") for m in logged) for stage in built}
    assert ran == built, logged
    for variant in pd.read_csv(tmp_path / rf.AUTOATTACK_SWEEP / "sweep.csv")["variant"]:
        mart = (tmp_path / rf.AUTOATTACK_SWEEP / variant / "mart").resolve()
        assert mart.parent == (store / "mart").resolve() and mart in {p.resolve() for p in _entries(store, "mart")}

    # The command line on the same work dir: everything cached, and the CSV has the committed file's columns.
    out = tmp_path / "rows.csv"
    assert rf.main(["--quick", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert " ran in " not in printed and "teacher: cached" in printed
    rows = pd.read_csv(out)
    committed = list(pd.read_csv(COMMITTED_CSV, nrows=0).columns)
    assert list(rows.columns) == [c for c in committed if c != "cw30"]  # --quick runs no CW-30
    assert len(rows) == 6 and (rows["arch"] == rf.QUICK.arch).all()


def test_bad_seed_is_a_user_error_before_anything_runs(tmp_path, capsys):
    assert rf.main(["--quick", "--seeds", "-1", "--workdir", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_summary_mean_and_std_over_seeds():
    import dataclasses

    raw = pd.DataFrame([{"seed": s, "loss": "mart", "data": d, "unsup_fraction": u, "clean": c, "pgd20": p, "n": 64,
                         "autoattack-fast": p - 3.125, "n_autoattack": 32}
                        for s, d, u, c, p in [(0, "labels only", 0.0, 80.0, 40.0), (1, "labels only", 0.0, 82.0, 44.0),
                                              (0, "pool", 0.5, 84.0, 50.0), (1, "pool", 0.5, 86.0, 52.0)]])
    table = rf.summarize(raw, dataclasses.replace(rf.QUICK, autoattack_n=32))
    assert list(table.columns) == ["loss", "data", "clean", "pgd20", "autoattack-fast", "n", "n_autoattack", "seeds"]
    assert table["pgd20"].tolist() == ["42.0 ± 2.8", "51.0 ± 1.4"]
    assert table["autoattack-fast"].tolist() == ["38.9 ± 2.8", "47.9 ± 1.4"]
    assert table["seeds"].tolist() == [2, 2]
    assert rf.pool_gains(raw) == {"mart": 9.0}
