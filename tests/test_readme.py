"""The worked pool provider of the docs (docs/dev/extending.md) is real code: it must work as printed."""
import re
import sys

import numpy as np

from data.labeled import LabeledSet
from data.pools import open_pool
from tests.conftest import ROOT


def test_docs_custom_provider_runs(tmp_path, monkeypatch):
    page = (ROOT / "docs" / "dev" / "extending.md").read_text()
    code = re.search(r"```python\n(# mypools\.py.*?)```", page, re.S).group(1)
    (tmp_path / "mypools.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mypools", None)
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8) for n in (5, 7)]
    for i, part in enumerate(parts):
        np.save(shards / f"shard{i}.npy", part)
    labeled = LabeledSet("toy", parts[0], np.zeros(5, np.int64), parts[0], np.zeros(5, np.int64),
                         tuple(str(k) for k in range(10)))
    pool = open_pool("mypools:shards", {"path": str(shards), "count": 2}, labeled=labeled,
                     remainder_index=np.zeros(0, np.int64))
    assert len(pool) == 12
    assert np.array_equal(pool.read(3, 9), np.concatenate(parts)[3:9])
