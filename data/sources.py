"""Open a run's data once: the labeled set, its labeled/remainder split, and the unlabeled pool.

The runner opens these before any stage starts, so a missing dataset or a malformed pool is
reported in seconds rather than after an hour of teacher training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.labeled import LabeledSet, labeled_split, load_labeled
from data.pools import open_pool


@dataclass
class DataSources:
    config: object  # pipeline.config.Config
    labeled: LabeledSet
    labeled_index: np.ndarray  # rows of the training split used with their labels
    remainder_index: np.ndarray  # the other rows (their labels hidden from training)
    pool: object | None = field(default=None)

    def fingerprint(self) -> str:
        return self.labeled.fingerprint()

    def ensure_pool(self):
        if self.pool is None:
            pool_cfg = self.config.pool
            options = dict(pool_cfg.options)
            if pool_cfg.path:
                options["path"] = pool_cfg.path
            self.pool = open_pool(pool_cfg.provider, options, labeled=self.labeled,
                                  remainder_index=self.remainder_index, limit=pool_cfg.limit,
                                  convert=pool_cfg.convert)
        return self.pool


def open_sources(config, *, need_pool: bool) -> DataSources:
    data_cfg = config.data
    labeled = load_labeled(data_cfg.dataset, data_cfg.root, data_cfg.download)
    labeled_index, remainder_index = labeled_split(labeled.train_labels, data_cfg.num_labeled, config.run.seed)
    sources = DataSources(config, labeled, labeled_index, remainder_index)
    if need_pool:
        sources.ensure_pool()
    return sources
