import numpy as np
import pytest
import torch

from ml.labeling import NearDuplicateFilter


def test_dedup_drops_a_planted_near_duplicate_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, size=(300, 32, 32, 3), dtype=np.uint8)
    pool = rng.integers(0, 256, size=(50, 32, 32, 3), dtype=np.uint8)
    near = test[123].astype(np.int16)
    near[0, 0, 0] = np.clip(near[0, 0, 0] + 20, 0, 255)  # one pixel moved by 20/255: L2 ~ 0.08
    pool[17] = near.astype(np.uint8)
    pool[31] = test[7]  # an exact copy
    dedup = NearDuplicateFilter(test, threshold=2000 / 255, device=torch.device("cpu"), block=128)
    flags = dedup.duplicates(pool)
    assert flags.dtype == bool and flags.shape == (50,)
    assert np.flatnonzero(flags).tolist() == [17, 31]


def test_dedup_threshold_is_an_l2_distance_on_unit_pixels():
    test = np.zeros((1, 4, 4, 1), dtype=np.uint8)
    pool = np.zeros((2, 4, 4, 1), dtype=np.uint8)
    pool[0, 0, 0, 0] = 255  # distance exactly 1.0
    pool[1, :2, 0, 0] = 255  # distance sqrt(2)
    dedup = NearDuplicateFilter(test, threshold=1.2, device=torch.device("cpu"))
    assert dedup.duplicates(pool).tolist() == [True, False]


def test_quality_summed_in_blocks_equals_the_whole_columns(tmp_path, monkeypatch):
    """quality.csv and results.csv from block-wise sums (3 rows a block here) match numpy over whole columns."""
    from types import SimpleNamespace

    import h5py
    import pandas as pd

    from stages import pseudolabel

    rng = np.random.default_rng(1)
    n, k = 20, 4
    labels, confidence = rng.integers(0, k - 1, n), rng.random(n).astype(np.float32)  # class 3: never predicted
    pool_index = np.sort(rng.choice(50, n, replace=False))
    truth = rng.integers(0, k, 50)
    with h5py.File(tmp_path / "pseudolabels.h5", "w") as f:
        f["labels"], f["confidence"], f["pool_index"] = labels, confidence, pool_index
    ctx = SimpleNamespace(out_dir=tmp_path, log=lambda message: None,
                          config=SimpleNamespace(pool=SimpleNamespace(provider="labeled-remainder")),
                          sources={"labeled": SimpleNamespace(dataset=SimpleNamespace(class_names=list("abcd")))})
    monkeypatch.setattr(pseudolabel, "_SUM_BLOCK", 3)
    pseudolabel._write_results(ctx, SimpleNamespace(provided_labels=lambda: truth))

    quality = pd.read_csv(tmp_path / "quality.csv").set_index("class")
    for c, name in enumerate("abc"):
        mask = labels == c
        assert quality.loc[name, "count"] == mask.sum()
        assert quality.loc[name, "precision"] == pytest.approx((truth[pool_index][mask] == c).mean())
        assert quality.loc[name, "mean_confidence"] == pytest.approx(confidence[mask].mean())
    assert quality.loc["d", "count"] == 0 and np.isnan(quality.loc["d", "precision"])
    accuracy = (truth[pool_index] == labels).mean()
    assert quality.loc["all", "precision"] == pytest.approx(accuracy)
    results = pd.read_csv(tmp_path / "results.csv")
    assert results["accuracy"].tolist() == pytest.approx([accuracy]) and results["n"].tolist() == [n]


def test_keep_top_fraction_keeps_the_most_confident_per_class_ties_to_the_earlier_row():
    from ml.labeling import most_confident_rows

    labels = np.array([0, 1, 0, 0, 1, 0, 2, 0])
    confidence = np.array([0.9, 0.5, 0.7, 0.9, 0.6, 0.1, 0.3, 0.8], dtype=np.float32)
    # class 0: five rows, ceil(0.5 * 5) = 3 kept: 0.9 (row 0), 0.9 (row 3), 0.8 (row 7); class 1: one of two;
    # class 2: its only row.
    assert np.flatnonzero(most_confident_rows(labels, confidence, 0.5, 3)).tolist() == [0, 3, 4, 6, 7]
    assert most_confident_rows(labels, confidence, 1.0, 3).all()
    tie = most_confident_rows(np.zeros(4, np.int64), np.full(4, 0.5, np.float32), 0.5, 1)
    assert tie.tolist() == [True, True, False, False]
    # 0.2 * 500,000 is 100,000 (not 100,001 through float rounding), as DM-AT keeps of each class.
    many = most_confident_rows(np.zeros(500_000, np.int64), np.linspace(0, 1, 500_000, dtype=np.float32), 0.2, 1)
    assert many.sum() == 100_000 and many[-100_000:].all()
