"""The data sources stages declare as inputs, with the config sections they read: the labeled set ([data],
with its labeled/remainder split) and the unlabeled pool ([pool]). Each has a cheap fingerprint (file
digests through the digest cache; no image rows, no torch) and an `open` that loads and checks it, which
the runner calls only when a stage that reads the source will run. The engine finds the two sections
through the Sources below (pipeline/library.py), never by importing this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.core.checks import INT64_MAX, Range
from pipeline.core.fingerprint import file_digest, fingerprint
from pipeline.stage import Source


@dataclass
class DataConfig:
    """[data]: the labeled set and how much of it is labeled."""

    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | package.module:function
    root: str = ""  # where local files live ("" = the dataset's usual places, e.g. Debian's package)
    download: bool = False  # fetch with torchvision when the files are missing (needs internet)
    num_labeled: int = 4000  # class-balanced labeled subset of the training split; 0 = all of it

    RANGES: ClassVar[dict] = {"num_labeled": Range(0, INT64_MAX, meaning="0 = the whole training split")}


# pool.provider for the generate stage's shards: the pseudolabel stage reads them from that stage's entry
# (data/pool_shards.py), never through open_pool, and no other [pool] key applies.
GENERATED = "generate"


@dataclass
class PoolConfig:
    """[pool]: the unlabeled pool. Keys the dataclass does not name go to `options`, for the provider."""

    provider: str = "labeled-remainder"  # built-in name, entry point in rst_mart.pools, or module:factory
    # The pool's file (or folder), a glob of its parts ("pool/part-*.npz"), or a list of files read in order.
    path: str | list[str] = ""
    limit: int = 0  # use the first N pool images; 0 = all
    convert: list[str] = field(default_factory=list)  # explicit conversions, e.g. ["gray-to-rgb", "resize"]
    options: dict = field(default_factory=dict)  # any other [pool] key, passed to the provider

    RANGES: ClassVar[dict] = {"limit": Range(0, INT64_MAX, meaning="0 = the whole pool")}

    def check(self, config, refuse, world_size: int) -> None:
        """A built-in provider's [pool] keys against the ones it takes, before any stage runs (a plugin's are
        checked when it is constructed: importing it here could be slow). Without this, a key the provider
        does not read (pool.path with labeled-remainder) would be silently ignored, and the run not be the
        one the user asked for."""
        from data.pools import unused_pool_options

        if self.provider == GENERATED and (self.limit or self.convert):
            key = "pool.limit" if self.limit else "pool.convert"
            raise refuse(key, "the generate stage's pool is made at the labeled images' shape and size, so it "
                         "takes no conversion or limit", "Remove it, and set generate.n to the number of images "
                         "you want generated.")
        unused, accepted = unused_pool_options(self.provider, _pool_options(config))
        if unused:
            takes = f"it takes {', '.join('pool.' + k for k in accepted)}" if accepted else "it takes no options"
            raise refuse("pool.provider", f"{takes}, but pool.{unused[0]} is set too, and would be ignored",
                         f"Remove pool.{unused[0]} (from the [pool] section or the --set), or choose the provider "
                         "that reads it (e.g. pool.provider=npz for a pool.path of .npz files).")


@dataclass(frozen=True)
class LabeledData:
    """The labeled set and the run's split of its training images."""

    dataset: object  # data.labeled.LabeledSet
    labeled_index: np.ndarray  # rows of the training split used with their labels
    remainder_index: np.ndarray  # the other rows (their labels hidden from training)


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


LABELED = Source("labeled", labeled_fingerprint, open_labeled, section="data", config=DataConfig)
POOL = Source("pool", pool_fingerprint, open_pool_source, section="pool", config=PoolConfig)
