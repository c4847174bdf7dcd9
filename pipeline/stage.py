"""What a stage declares and what it receives: the engine's whole view of stages and data sources.

A stage module declares one `Stage` next to its code, with the dataclass of its config section; the
registry (pipeline/stage_registry.py) finds the built-in ones in `stages/` and third-party ones through the
entry-point group `rst_mart.stages`. The engine fingerprints, plans and runs from these declarations
alone: it never names a stage or a data source and never imports torch. Heavy modules are imported
inside a stage's `run`, so `status` stays light. This module is the contract, on the floor of
pipeline/core: stages import it and pipeline.core, never the engine.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the contract's floor: pipeline.core only
    from pipeline.core.distributed import DistInfo


# The [run] keys that change how fast a stage runs, not what it computes: a stage that uses them lists
# them in both `reads` and `insignificant` (precision is not among them: autocast changes the numbers).
RUNTIME = ("run.device", "run.num_workers", "run.channels_last", "run.compile", "run.checkpoint_every_s",
           "run.sync_bn")


@dataclass(frozen=True)
class Source:
    """A data source a stage reads (the labeled set, the pool, an imported checkpoint).

    `fingerprint(config)` must be cheap: file digests through the digest cache, never image rows.
    `open(config, cache_dir)` returns the opened source and checks it (shapes, dtypes, labels); it runs
    only when a stage that reads the source will run, before the first stage of that `run` starts.
    Sources see the whole config. A source may declare its config section as a stage does (`section`,
    `config`: the dataclass, with `RANGES` and `check(self, config, refuse, world_size)`, `config` the
    whole config); the engine finds the built-in ones by name (pipeline/library.py).
    """

    name: str
    fingerprint: Callable[[Any], str]
    open: Callable[[Any, Path], Any]
    section: str = ""  # its config section, [<section>] in the TOML file; "" = none
    config: type | None = None  # the dataclass of that section


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: `run(ctx)` writes `outputs` into `ctx.out_dir`.

    `outputs` is a tuple of file names, or a function of the stage's config view returning one, for a
    stage whose files depend on its settings (generate: one shard file per `generate.shard_size` images);
    the engine asks `output_names(config)`.

    `config` is the dataclass of its section (every default commented with its unit). It may hold
    `RANGES: ClassVar[dict]` (key -> pipeline.core.checks.Range or a tuple of choices) and the methods
    `check(self, config, refuse, world_size)` (values against each other, `config` the stage's view)
    and `check_sources(self, config, sources)` (against the opened sources, before any stage runs).
    """

    name: str
    version: int  # bump when the meaning of the stage's output changes
    section: str  # its config section, [<section>] in the TOML file
    outputs: tuple[str, ...] | Callable[[StageConfig], tuple[str, ...]]
    run: Callable[[StageContext], None]
    config: type | None = None  # the dataclass of its section; None = a stage without settings
    # Upstream stage names and data sources the stage reads, for a given config (its view).
    inputs: Callable[[Any], tuple[str | Source, ...]] = lambda config: ()
    # "section.key" (or "section.*": all its keys) of other sections it reads; they change results unless
    # insignificant
    reads: tuple[str, ...] = ()
    insignificant: tuple[str, ...] = ()  # own keys, or entries of `reads`, that do not change results
    default: bool = False  # run by `python -m pipeline run` without --stages
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
    # For a stage whose work splits into independent shards, each the same whichever process makes it:
    # how many there are (config view -> int). `run(ctx)` then honours `ctx.shard`, and the runner may have
    # the shards made by several processes (torchrun's ranks, `run --launcher local|slurm --jobs N`)
    # before it runs the stage once more with shard=None and commits it.
    shards: Callable[[StageConfig], int] | None = None

    def output_names(self, config) -> tuple[str, ...]:
        """The file names a finished entry holds, for this config."""
        return tuple(self.outputs(self.view(config)) if callable(self.outputs) else self.outputs)

    @property
    def code_version(self) -> str:
        return f"{self.name}/v{self.version}"

    def upstream(self, config) -> tuple[str, ...]:
        return tuple(i for i in self.inputs(self.view(config)) if isinstance(i, str))

    def sources(self, config) -> tuple[Source, ...]:
        return tuple(i for i in self.inputs(self.view(config)) if isinstance(i, Source))

    def params(self, config) -> dict[str, Any]:
        """What enters the fingerprint: its own section and its declared reads, less the insignificant."""
        own = {k: v for k, v in _section_dict(config, self.section).items() if k not in self.insignificant}
        params = {self.section: own}
        for dotted in self.reads:
            if dotted not in self.insignificant:
                section, key = dotted.split(".")
                values = _section_dict(config, section)
                params[dotted] = values if key == "*" else values[key]
        return params

    def view(self, config) -> StageConfig:
        return config if isinstance(config, StageConfig) else StageConfig(self, config)


def _section_dict(config, name: str) -> dict[str, Any]:
    if isinstance(config, StageConfig):
        config = config._config
    return config.section(name) if hasattr(config, name) else {}


class StageConfig:
    """The config as a stage sees it: its own section whole, and of other sections only the keys it
    declares in `reads`. Anything else raises AttributeError, so a setting the fingerprint does not
    cover cannot be read by mistake."""

    def __init__(self, stage: Stage, config: Any):
        self._stage, self._config = stage, config
        self._reads: dict[str, set[str]] = {}
        for dotted in stage.reads:
            section, key = dotted.split(".")
            self._reads.setdefault(section, set()).add(key)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name == self._stage.section:
            return getattr(self._config, name)
        if name in self._reads:
            return SectionView(self._stage.name, name, getattr(self._config, name), self._reads[name])
        raise AttributeError(f"stage {self._stage.name} reads the config section [{name}], which it does not "
                             f"declare; add the keys it needs to its Stage(reads=...) as \"{name}.KEY\" (they "
                             f"enter its fingerprint unless also listed as insignificant).")


class SectionView:
    """Another stage's or the engine's section, limited to the keys a stage declares it reads."""

    def __init__(self, stage: str, section: str, values: Any, keys: set[str]):
        self._stage, self._section, self._values, self._keys = stage, section, values, keys

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        if key not in self._keys and "*" not in self._keys:
            raise AttributeError(f"stage {self._stage} reads `{self._section}.{key}`, which it does not declare; "
                                 f"add \"{self._section}.{key}\" to its Stage(reads=...) (it enters its "
                                 f"fingerprint unless also listed as insignificant).")
        return getattr(self._values, key)

    def __repr__(self) -> str:
        shown = self._values if "*" in self._keys else {k: getattr(self._values, k) for k in sorted(self._keys)}
        return f"[{self._section}] as stage {self._stage} reads it: {shown}"


@dataclass(frozen=True)
class StageInput:
    """A finished upstream stage as a stage sees it: where its outputs are and what it was."""

    path: Path
    fingerprint: str


class LiveLogSettings(Protocol):
    """The engine's [log] section (pipeline.config.LogConfig) as a stage's training loop reads it
    (ml.live_log.open_scalar_log)."""

    tensorboard: bool
    wandb: bool
    wandb_project: str
    wandb_mode: str
    every_steps: int
    PACKAGES: dict[str, str]


@dataclass
class StageContext:
    """Everything a stage may read: its view of the config, its upstream stages, its opened data sources."""

    config: StageConfig  # its own section and the keys it declares from others
    out_dir: Path  # the partial directory the stage writes into
    inputs: dict[str, StageInput]  # upstream stage name -> its finished entry
    sources: dict[str, Any]  # data source name -> what its `open` returned (each source has its own type)
    fingerprint: str
    dist: DistInfo  # this process's rank and world size (pipeline.core.distributed)
    log: Callable[[str], None] = print
    live_log: LiveLogSettings | None = None  # live curves, a run-time setting outside fingerprints
    # (index, count) for a sharded stage (Stage.shards): make only the missing shards s with s % count ==
    # index, each written atomically into out_dir, and none of the final outputs. None: make every missing
    # shard, then write the final outputs. This call may run on a single process while other ranks wait
    # (rank 0 finishing after torchrun's ranks made their shards): with shard=None, use no collectives.
    shard: tuple[int, int] | None = None
