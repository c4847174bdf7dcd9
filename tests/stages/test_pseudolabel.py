import numpy as np
import torch

from stages.labeling import NearDuplicateFilter


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
