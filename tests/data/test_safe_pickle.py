"""safe_load: numpy pickles load, code-running pickles and broken files are UserErrors."""
import os
import pickle

import numpy as np
import pytest

from data.safe_pickle import safe_load
from pipeline.core.errors import UserError


class _RunsShell:
    """Unpickling this would run a shell command (the attack safe_load exists to stop)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_numpy_dict(tmp_path, protocol):
    content = {b"data": np.arange(24, dtype=np.uint8).reshape(2, 3, 4), "labels": [1, 2], "n": np.int64(7)}
    path = tmp_path / "batch.pickle"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    loaded = safe_load(path)
    assert set(loaded) == {"data", "labels", "n"}  # bytes keys come back as str
    np.testing.assert_array_equal(loaded["data"], content[b"data"])
    assert loaded["labels"] == [1, 2] and loaded["n"] == 7


def test_loads_numpy1_spelling_without_warning(tmp_path, recwarn):
    # Pickles written under numpy 1 name numpy.core.multiarray; protocol 2 spells globals as text.
    raw = pickle.dumps({"data": np.ones((2, 2), np.float32)}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path = tmp_path / "old.pickle"
    path.write_bytes(raw)
    np.testing.assert_array_equal(safe_load(path)["data"], np.ones((2, 2), np.float32))
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_refuses_code_and_does_not_run_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"data": _RunsShell(marker)}, protocol=2))
    with pytest.raises(UserError, match="refuses") as err:
        safe_load(path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    assert not marker.exists()


def test_truncated_pickle(tmp_path):
    path = tmp_path / "cut.pickle"
    path.write_bytes(pickle.dumps({"data": np.zeros((4, 8), np.uint8)}, protocol=4)[:-20])
    with pytest.raises(UserError, match="truncated") as err:
        safe_load(path)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.pickle"
    with pytest.raises(UserError) as err:
        safe_load(path)
    assert str(path) in str(err.value)
