"""What a stage declares and what it receives: the engine's whole view of stages and data sources.

A stage module declares one `Stage` next to its code; `stages/__init__.py` collects them. The engine
fingerprints, plans and runs from these declarations alone: it never names a data source and never
imports torch. Heavy modules are imported inside a stage's `run`, so `status` stays light.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Source:
    """A data source a stage reads (the labeled set, the pool, an imported checkpoint).

    `fingerprint(config)` must be cheap: file digests through the digest cache, never image rows.
    `open(config, cache_dir)` returns the opened source and checks it (shapes, dtypes, labels); it runs
    only when a stage that reads the source will run, before the first stage of that `run` starts.
    """

    name: str
    fingerprint: Callable[[Any], str]
    open: Callable[[Any, Path], Any]


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: `run(ctx)` writes `outputs` into `ctx.out_dir`."""

    name: str
    version: int  # bump when the meaning of the stage's output changes
    section: str  # its config section
    outputs: tuple[str, ...]
    run: Callable[["StageContext"], None]
    # Upstream stage names and data sources the stage reads, for a given config.
    inputs: Callable[[Any], tuple[str | Source, ...]] = lambda config: ()
    insignificant: tuple[str, ...] = ()  # keys of its own section that do not change results
    extra_params: tuple[str, ...] = ()  # "section.key" of other sections that do change results
    # True for a stage whose results depend on how many torchrun processes share its batches (training:
    # BatchNorm statistics and the augmentation and attack draws are per rank's slice); the runner then
    # adds run.world_size and run.sync_bn to its params when the world size is not 1.
    distributed_changes_results: bool = False
    # What a finished entry contributes, read from its directory (heavy imports inside the functions):
    # `results(entry)` -> rows {"metric": name unique in the stage, "value": number, ...descriptive
    # columns}, printed after `run` and one sweep.csv column `<stage>.<metric>` each ("axis": "x" or
    # "y" puts the metric on that axis of sweep.png); `report(entry)` -> its report.html section body.
    results: Callable[[Path], list[dict]] | None = None
    report: Callable[[Path], str] | None = None

    @property
    def code_version(self) -> str:
        return f"{self.name}/v{self.version}"

    def upstream(self, config) -> tuple[str, ...]:
        return tuple(i for i in self.inputs(config) if isinstance(i, str))

    def sources(self, config) -> tuple[Source, ...]:
        return tuple(i for i in self.inputs(config) if isinstance(i, Source))

    def params(self, config) -> dict[str, Any]:
        own = {k: v for k, v in config.section(self.section).items() if k not in self.insignificant}
        params = {self.section: own}
        for dotted in self.extra_params:
            section, key = dotted.split(".")
            params[dotted] = config.section(section)[key]
        return params


@dataclass(frozen=True)
class StageInput:
    """A finished upstream stage as a stage sees it: where its outputs are and what it was."""

    path: Path
    fingerprint: str


@dataclass
class StageContext:
    """Everything a stage may read: the config, its upstream stages, its opened data sources."""

    config: Any  # pipeline.config.Config
    out_dir: Path  # the partial directory the stage writes into
    inputs: dict[str, StageInput]  # upstream stage name -> its finished entry
    sources: dict[str, Any]  # data source name -> the opened source
    fingerprint: str
    dist: Any  # pipeline.core.distributed.DistInfo
    log: Callable[[str], None] = print
    live_log: Any = None  # pipeline.config.LogConfig: live curves, a run-time setting outside fingerprints
