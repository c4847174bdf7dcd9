"""The data sources stages declare as inputs: the labeled set (with its labeled/remainder split) and
the unlabeled pool. Each has a cheap fingerprint (file digests through the digest cache; no image
rows, no torch) and an `open` that loads and checks it, which the runner calls only when a stage that
reads the source will run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.fingerprint import file_digest, fingerprint
from pipeline.stage import Source


@dataclass(frozen=True)
class LabeledData:
    """The labeled set and the run's split of its training images."""

    dataset: object  # data.labeled.LabeledSet
    labeled_index: np.ndarray  # rows of the training split used with their labels
    remainder_index: np.ndarray  # the other rows (their labels hidden from training)


# pool.provider for the generate stage's shards: the pseudolabel stage reads them from that stage's entry
# (data/pool_shards.py), never through open_pool, and no other [pool] key applies.
GENERATED = "generate"

_opened: dict[tuple, LabeledData] = {}


def _labeled_key(config) -> tuple:
    d = config.data
    return d.dataset, d.root, d.download, d.num_labeled, config.run.seed


def open_labeled(config, cache_dir: Path | None = None) -> LabeledData:
    """Load, check and split the labeled set (once per process for the same config keys)."""
    from data.labeled import labeled_split, load_labeled

    key = _labeled_key(config)
    if key not in _opened:
        data_cfg = config.data
        labeled = load_labeled(data_cfg.dataset, data_cfg.root, data_cfg.download)
        labeled_index, remainder_index = labeled_split(labeled.train_labels, data_cfg.num_labeled, config.run.seed)
        _opened[key] = LabeledData(labeled, labeled_index, remainder_index)
    return _opened[key]


def labeled_fingerprint(config) -> str:
    """Digest of the dataset's files when they are known (the built-ins), else of its loaded content."""
    from data.labeled import dataset_files

    files = dataset_files(config.data.dataset, config.data.root)
    if files is not None:
        return fingerprint({"files": [file_digest(f) for f in files]})
    return open_labeled(config).dataset.fingerprint()


def open_pool_source(config, cache_dir: Path) -> object:
    """The pool, converted, limited and checked against the labeled set's image shape."""
    from data.pools import open_pool

    split = open_labeled(config)
    return open_pool(config.pool.provider, _pool_options(config), labeled=split.dataset,
                     remainder_index=split.remainder_index, limit=config.pool.limit, convert=config.pool.convert,
                     cache_dir=cache_dir)


def pool_fingerprint(config) -> str:
    """The pool's fingerprint without reading a row: labeled-remainder's follows from the labeled set and
    the split; a file pool's from its files' digests (cached); a plugin's from its own fingerprint()."""
    from data.pools import pool_identity

    pool_cfg = config.pool
    if pool_cfg.provider == "labeled-remainder":
        identity = {"labeled": labeled_fingerprint(config), "num_labeled": config.data.num_labeled,
                    "seed": config.run.seed}
    else:
        identity = pool_identity(pool_cfg.provider, _pool_options(config))
    return fingerprint({"provider": pool_cfg.provider, "identity": identity, "limit": pool_cfg.limit,
                        "convert": list(pool_cfg.convert)})


def _pool_options(config) -> dict:
    options = dict(config.pool.options)
    if config.pool.path:
        options["path"] = config.pool.path
    return options


LABELED = Source("labeled", labeled_fingerprint, open_labeled)
POOL = Source("pool", pool_fingerprint, open_pool_source)
