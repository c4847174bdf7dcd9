"""Configuration: one dataclass per TOML section, every default commented with its unit.

The engine's sections ([run], [log], [launcher]) are here; the data sources declare theirs ([data], [pool])
next to their code (data/sources.py, found through pipeline/library.py), every stage its own next to its
code, and `Config` is composed from these registries, so a plug-in stage's section is read, overridden
with `--set` and checked like the built-ins'.

A config file only needs the keys it changes; `--set section.key=value` overrides any key with a
value parsed and checked against the field's type. Unknown sections and keys are refused, except in a
section whose dataclass has an `options` dict ([pool]): its other keys go there, for the plug-in that
reads them (which refuses the ones it does not take). After the overrides, `config_checks.validate`
checks every value's range and the values against each other (and the batch sizes against torchrun's
world size), so a bad value fails before any stage runs, not hours in. No torch here: `status` must stay
quick.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config_checks import validate
from pipeline.core.checks import INT64_MAX, Range, at_least
from pipeline.core.errors import UserError, missing_package_error

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "demo.toml"


# Batches prefetched ahead, each held in memory until used: more than a few never helps.
MAX_PREFETCH = 64


@dataclass
class RunConfig:
    """[run]: how stages run. `num_workers` is not DataLoader worker processes: it is the depth of one
    background thread's queue of gathered batches. It is used as given on a GPU; on a CPU it silently
    becomes 0 unless a core is left over from torch's compute threads (data.mixed.prefetch_depth: there,
    the gathering thread preempts the step's OpenMP team and slows every step)."""

    seed: int = 0  # seeds every random stream: data split, init, sampling, augmentation, attack starts
    device: str = "auto"  # auto | cpu | cuda | cuda:N ("auto" takes CUDA when present)
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto (bf16 where native): training autocast; evaluation is fp32
    channels_last: bool = False  # NHWC memory format for convolutions (faster on GPUs, and with oneDNN on CPUs)
    compile: bool = False  # torch.compile the training forwards and the attack's (ml.devices.attack_forward)
    num_workers: int = 2  # batches prefetched by one thread (not processes); 0 = none; 0 on a CPU with no core spare
    checkpoint_every_s: float = 60.0  # seconds between mid-epoch checkpoints (and one per epoch end); 0 = every step
    sync_bn: bool = False  # SyncBatchNorm across ranks under torchrun (GPU)
    store: str = ""  # the stage store; "" = $RST_MART_STORE, else .store beside the work dir (runs/.store)

    RANGES: ClassVar[dict] = {
        "seed": Range(0, INT64_MAX, meaning="it seeds numpy and torch generators"),
        "precision": ("fp32", "bf16", "fp16", "auto"),
        "num_workers": Range(0, MAX_PREFETCH, meaning="batches prepared ahead, each held in memory; 0 = none"),
        "checkpoint_every_s": at_least(0, "seconds between mid-epoch checkpoints; 0 = after every step"),
    }

    def check(self, config, refuse, world_size: int) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:[0-9]+", self.device):
            raise refuse("run.device", "it must be one of auto, cpu, cuda or cuda:N", "")


@dataclass
class LogConfig:
    """[log]: live curves while a stage trains (ml.live_log). No key changes results, so no stage declares
    one: they stay out of every fingerprint, and the runner hands the section to stages as ctx.live_log."""

    tensorboard: bool = False  # TensorBoard event files in <entry>/tensorboard/ (needs `tensorboard`)
    wandb: bool = False  # a Weights & Biases run in <entry>/wandb/ (needs `wandb`)
    wandb_project: str = "rst-mart"  # the W&B project the run belongs to
    wandb_mode: str = "offline"  # online | offline (no network; upload with `wandb sync <entry>/wandb/offline-run-*`)
    every_steps: int = 50  # optimizer steps between interval writes (each costs one host-device sync)

    RANGES: ClassVar[dict] = {"wandb_mode": ("online", "offline"),
                              "every_steps": at_least(1, "optimizer steps between live-curve writes")}

    # What each option needs installed, pinned as pyproject's `log` extra (ml.live_log says so too).
    PACKAGES: ClassVar[dict[str, str]] = {"tensorboard": "tensorboard==2.21.0", "wandb": "wandb==0.31.0"}

    def check_installed(self) -> None:
        """Refuse before any stage runs when an option is on and its package is missing (the stage would
        only find out when it starts training, maybe hours into a run)."""
        import importlib.util

        for option in ("tensorboard", "wandb"):
            if getattr(self, option) and importlib.util.find_spec(option) is None:
                raise missing_package_error(f"log.{option}", self.PACKAGES[option], extra="log")


@dataclass
class LauncherConfig:
    """How `sweep`/`run --launcher slurm` ask SLURM for each job (no stage reads it: not in any fingerprint)."""
    partition: str = ""  # SLURM partition; "" = the cluster's default
    time_min: int = 60  # wall-clock limit per job, minutes; a job reaching it checkpoints and is requeued
    nodes: int = 1  # nodes per variant; > 1 trains one variant across nodes (torch.distributed, as torchrun)
    tasks_per_node: int = 1  # processes per node, one per GPU
    gpus_per_node: int = 0  # GPUs per node; 0 = none
    cpus_per_task: int = 0  # CPU cores per process (also its torch threads); 0 = the cluster's default
    mem_gb: int = 0  # memory per node, GiB; 0 = the cluster's default
    sbatch: list[str] = field(default_factory=list)  # other sbatch options, e.g. ["--qos=high", "--account=lab"]
    max_requeues: int = 3  # time-outs a job may checkpoint and be requeued after before it counts as failed

    RANGES: ClassVar[dict] = {
        "time_min": at_least(1, "minutes of wall clock per SLURM job"),
        "nodes": at_least(1, "nodes per variant"),
        "tasks_per_node": at_least(1, "processes per node, one per GPU"),
        "gpus_per_node": at_least(0, "0 = none"),
        "cpus_per_task": at_least(0, "0 = the cluster's default"),
        "mem_gb": at_least(0, "0 = the cluster's default"),
        "max_requeues": at_least(0, "time-outs a job may be requeued after"),
    }


# The engine's sections; the data sources and each stage declare theirs next to their code.
ENGINE_SECTIONS: dict[str, type] = {"run": RunConfig, "log": LogConfig, "launcher": LauncherConfig}


def section_types() -> dict[str, type]:
    """Every section's dataclass: the engine's, the data sources', then the registered stages' (built-ins
    and plug-ins)."""
    from pipeline.library import source_sections
    from pipeline.stage_registry import stages

    types = dict(ENGINE_SECTIONS)
    declared = [(f"the data source {source.name!r}", source.section, source.config)
                for source in source_sections().values()]
    declared += [(f"the stage {stage.name!r}", stage.section, stage.config)
                 for stage in stages().values() if stage.config is not None]
    for who, section, kind in declared:
        if section in types:
            raise UserError(f"{who} declares the config section [{section}], which is already the engine's or "
                            f"a data source's; give it a section of its own.")
        types[section] = kind
    return types


class Config:
    """The whole config: one attribute per section (`config.run.seed`), each that section's dataclass."""

    def __init__(self, **sections: Any):
        for name, kind in section_types().items():
            setattr(self, name, sections.pop(name) if name in sections else kind())
        if sections:
            raise TypeError(f"Config has no sections {sorted(sections)}")

    def section_names(self) -> list[str]:
        return list(vars(self))

    def section(self, name: str) -> dict[str, Any]:
        """A section as a plain dict (a plug-in's `options` merged in), e.g. for fingerprints and stage.json."""
        values = dataclasses.asdict(getattr(self, name))
        if isinstance(values.get(_OPTIONS), dict):
            values.update(values.pop(_OPTIONS))
        return values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


# A section whose dataclass has this dict field takes the keys it does not name into it, for the plug-in
# that reads them ([pool]'s provider), which checks them itself.
_OPTIONS = "options"


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (defaults for what it omits), apply `section.key=value` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    raw = _read_toml(path)
    config = Config()
    sections = config.section_names()
    sources: dict[str, str] = {}  # "section.key" -> where its value came from, for error messages
    for section, values in raw.items():
        if section not in sections:
            raise UserError(f"config file {path} has an unknown section [{section}]; the sections are "
                            f"{', '.join(f'[{s}]' for s in sections)}.")
        if not isinstance(values, dict):
            raise UserError(f"config file {path}: `{section}` must be a [section] table, not a value.")
        for key, value in values.items():
            _assign(config, section, key, value, where=f"config file {path}")
            sources[f"{section}.{key}"] = f"config file {path}"
    for item in overrides:
        section, key, value = parse_override(item)
        _assign(config, section, key, value, where=f"--set {item}")
        sources[f"{section}.{key}"] = f"--set {item}"
    validate(config, sources=sources)
    return config


CONFIG_LIMIT_BYTES = 1 << 20  # 1 MiB: a config is a few KiB; /dev/zero or a FIFO must not hang or fill memory


def _read_toml(path: Path) -> dict:
    from pipeline.core.bounded import NotRegularFile, TooLarge, read_regular

    try:
        text = read_regular(path, CONFIG_LIMIT_BYTES).decode("utf-8")  # TOML is UTF-8 whatever the locale says
    except NotRegularFile as e:
        raise UserError(f"config file {path} is {e.kind}, not a regular file; pass the path of a .toml file "
                        f"with --config (the shipped ones are in {CONFIG_DIR}).") from None
    except TooLarge as e:
        raise UserError(f"config file {path} is over {CONFIG_LIMIT_BYTES // 2**20} MiB ({e.size} bytes or more): "
                        f"not a config; pass the path of a .toml file with --config.") from None
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; pass an existing file with --config "
                        f"(the shipped ones are in {CONFIG_DIR}).") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; pass the path of a .toml file with --config "
                        f"(the shipped ones are in {CONFIG_DIR}).") from None
    except PermissionError:
        raise UserError(f"config file {path} cannot be read (permission denied); make it readable "
                        f"(chmod u+r {path}) or pass a copy you can read with --config.") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                        f"{e.start}); TOML files must be UTF-8: save it as UTF-8 (for example "
                        f"iconv -f latin1 -t utf-8 {path} > fixed.toml) and pass that file.") from None
    except OSError as e:
        raise UserError(f"config file {path} cannot be read ({e.strerror or e}); pass a readable file "
                        "with --config.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e}); fix the syntax at that line.") from None
    except RecursionError:  # tomllib descends once per bracket: thousands of them exhaust Python's stack
        raise UserError(f"config file {path} nests lists or tables thousands of levels deep: not a config (a "
                        f"value nests at most {MAX_NESTING} levels); fix or replace the file.") from None


def parse_override(item: str) -> tuple[str, str, Any]:
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise UserError(f"--set {item!r} is not of the form section.key=value (for example --set run.seed=3).")
    return section, key.strip(), _parse_value(text)


def _parse_value(text: str) -> Any:
    """TOML syntax gives numbers, booleans and lists; anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise UserError(f"--set value {text[:40]}... nests lists or tables thousands of levels deep; a value "
                        f"nests at most {MAX_NESTING} levels.") from None


MAX_NESTING = 32  # lists and tables inside each other in one value; a real config needs two or three


def _check_sane(value: Any, name: str, where: str) -> None:
    """Refuse a value no config means: nested deeper than MAX_NESTING (fingerprinting and JSON would
    recurse once per level), or a string holding a NUL byte (no path or name can: the OS refuses it
    with a ValueError deep inside whatever opens it). Iterative, so the check itself cannot recurse."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_NESTING:
            raise UserError(f"{where}: `{name}` nests lists or tables more than {MAX_NESTING} levels deep; no "
                            f"setting takes that. Give it a flat value (see the key's comment in configs/demo.toml).")
        if isinstance(item, str) and "\0" in item:
            raise UserError(f"{where}: `{name}` holds a NUL byte (\\0 or \\u0000), which no path or name can "
                            f"contain; remove it.")
        if isinstance(item, dict):
            pending += [(k, depth + 1) for k in item] + [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            pending += [(v, depth + 1) for v in item]


def _assign(config: Config, section: str, key: str, value: Any, where: str) -> None:
    _check_sane(value, f"{section}.{key}", where)
    if section not in config.section_names():
        raise UserError(f"{where}: unknown section `{section}`; the sections are {', '.join(config.section_names())}.")
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if key not in hints and _OPTIONS in hints:
        getattr(target, _OPTIONS)[key] = value  # the plug-in validates its own keys when it is constructed
        return
    if key not in hints or key == _OPTIONS or typing.get_origin(hints[key]) is ClassVar:
        known = ", ".join(k for k, kind in hints.items() if k != _OPTIONS and typing.get_origin(kind) is not ClassVar)
        raise UserError(f"{where}: unknown key `{section}.{key}`; the keys of [{section}] are {known}.")
    setattr(target, key, _coerce(value, hints[key], f"{section}.{key}", where))


def _coerce(value: Any, kind: Any, name: str, where: str) -> Any:
    origin = typing.get_origin(kind) or kind
    if origin is types.UnionType:  # `str | list[str]`: one path, a glob, or a list of parts
        if any(_is_a(value, arm) for arm in typing.get_args(kind)):
            return value
        raise UserError(f"{where}: `{name}` must be {' or '.join(map(_described, typing.get_args(kind)))}, got "
                        f"{value!r}; for example {name.split('.')[1]} = \"a\" or [\"a\", \"b\"].")
    if origin is list and not typing.get_args(kind):  # a free-form list, checked by the code that reads it
        if isinstance(value, str):
            return [_parse_value(v.strip()) for v in value.split(",") if v.strip()]
        return value if isinstance(value, list) else [value]
    if origin is list:
        (element,) = typing.get_args(kind)
        if isinstance(value, str):  # --set eval.attacks=clean,pgd20 (each item parsed like a TOML value)
            value = [_parse_value(v.strip()) for v in value.split(",") if v.strip()]
        elif not isinstance(value, list):  # --set mart.milestones=75: a list of one
            value = [value]
        # A list of names takes strings only: [1, 2] for eval.attacks is a mistake, not "1" and "2".
        items = [_REFUSED if element is str and not isinstance(v, str) else _coerce_scalar(v, element)
                 for v in value]
        bad = [v for v, ok in zip(value, items) if ok is _REFUSED]
        if bad:
            raise UserError(f"{where}: `{name}` must be a list of {element.__name__}, got {value!r} (the item "
                            f"{bad[0]!r} is {type(bad[0]).__name__}); write it as [a, b, ...] with "
                            f"{element.__name__} items, or a,b,... after --set.")
        return items
    coerced = _coerce_scalar(value, origin)
    if coerced is _REFUSED:
        raise UserError(f"{where}: `{name}` must be {origin.__name__}, got {value!r} ({type(value).__name__}).")
    return coerced


_REFUSED = object()


def _is_a(value: Any, kind: Any) -> bool:
    """`value` is of `kind` as it stands (a union's arms are not converted into one another); a list must
    hold at least one item, none of them empty."""
    if typing.get_origin(kind) is list:
        (element,) = typing.get_args(kind)
        return isinstance(value, list) and bool(value) and all(isinstance(v, element) and v for v in value)
    return isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))


def _described(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"a non-empty list of {typing.get_args(kind)[0].__name__}"
    return kind.__name__


def _coerce_scalar(value: Any, kind: type) -> Any:
    """`value` as `kind` when it unambiguously is one (an int for a float, "true" for a bool), else _REFUSED."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif isinstance(value, bool):
        return _REFUSED
    elif kind is int:
        if isinstance(value, int):
            return value
    elif kind is float:
        if isinstance(value, (int, float)):
            return float(value)
    elif kind is str:
        if isinstance(value, (str, int, float)):
            return str(value)
    return _REFUSED
