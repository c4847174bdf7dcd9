"""Fixtures shared by the data tests."""
import numpy as np
import pytest

from data.labeled import LabeledSet


@pytest.fixture
def labeled():
    """A tiny 32x32x3 labeled set the pool tests check pools against."""
    rng = np.random.default_rng(1)
    return LabeledSet("toy", rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) % 10,
                      rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), np.arange(2),
                      tuple(f"c{i}" for i in range(10)))
