"""The config's checks: every value's range and the values against each other (and the training batches
against torchrun's world size), each refusal a UserError naming the key, its value, where it was set
and the fix. Run by `load_config` after the overrides; the engine's sections are checked here, each
stage's section by the ranges and checks its dataclass declares; `check_sources` once the sources a
stage reads are open. No torch here: `status` must stay quick."""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from pipeline import library, stage_registry
from pipeline.core.checks import check_values
from pipeline.core.distributed import dist_info
from pipeline.core.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import Config

_CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),  # and cuda:N
    "run.precision": ("fp32", "bf16", "fp16", "auto"),
    "log.wandb_mode": ("online", "offline"),
}

_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")

# The engine's integers end up in int64 places (numpy indices, torch seeds, the int64 columns of results
# tables); torch.manual_seed takes 0..2**64-1 and numpy any size, so int64 is the narrowest.
INT64_MAX = 2**63 - 1
_INT64_COUNT = (lambda v: 0 <= v <= INT64_MAX, f"in 0..{INT64_MAX} (2**63 - 1)")
# Batches gathered ahead, each held in memory until used: more than a few never helps.
MAX_NUM_WORKERS = 64

# Every number's allowed range in the engine's sections, with what the value means where that helps to
# choose a fix. The stages' sections declare theirs (RANGES on their dataclass).
_RANGES = {
    "run.seed": (*_INT64_COUNT, "it seeds numpy and torch generators"),
    "run.num_workers": (lambda v: 0 <= v <= MAX_NUM_WORKERS, f"in 0..{MAX_NUM_WORKERS}",
                        "batches prepared ahead, each held in memory; 0 = none"),
    "run.checkpoint_every_s": (*_AT_LEAST_0, "seconds between mid-epoch checkpoints; 0 = after every step"),
    "log.every_steps": (lambda v: v >= 1, ">= 1", "optimizer steps between live-curve writes"),
    "launcher.time_min": (lambda v: v >= 1, ">= 1", "minutes of wall clock per SLURM job"),
    "launcher.nodes": (lambda v: v >= 1, ">= 1", "nodes per variant"),
    "launcher.tasks_per_node": (lambda v: v >= 1, ">= 1", "processes per node, one per GPU"),
    "launcher.gpus_per_node": (*_AT_LEAST_0, "0 = none"),
    "launcher.cpus_per_task": (*_AT_LEAST_0, "0 = the cluster's default"),
    "launcher.mem_gb": (*_AT_LEAST_0, "0 = the cluster's default"),
    "launcher.max_requeues": (*_AT_LEAST_0, "time-outs a job may be requeued after"),
}


def validate(config: Config, *, world_size: int | None = None, sources: dict[str, str] | None = None) -> None:
    """Refuse, with a UserError naming the key, its value and the fix, any value a stage would crash on or
    silently misuse. `world_size` defaults to torchrun's WORLD_SIZE (1 without torchrun); `sources` maps
    "section.key" to where the value was set, for the message."""
    world_size = dist_info().world_size if world_size is None else world_size

    def refuse(key: str, problem: str, fix: str) -> UserError:
        where = "" if sources is None else f" (set by {sources[key]})" if key in sources else " (the default)"
        fix = fix or f"Change it in the [{key.split('.')[0]}] section of the config file, or with --set {key}=VALUE."
        return UserError(f"`{key}` is {_value(config, key)!r}{where}; {problem}. {fix}")

    for key, choices in _CHOICES.items():
        value = _value(config, key)
        if value not in choices and not (key == "run.device" and re.fullmatch(r"cuda:[0-9]+", value)):
            also = " or cuda:N" if key == "run.device" else ""
            raise refuse(key, f"it must be one of {', '.join(choices)}{also}", "")
    for key, (ok, rule, meaning) in _RANGES.items():
        value = _value(config, key)
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            raise refuse(key, f"it must be {'a finite number ' if isinstance(value, float) else ''}{rule}"
                              + (f" ({meaning})" if meaning else ""), "")
    for source in library.source_sections().values():  # a source sees the whole config
        _check_section(source.section, config, config, refuse, world_size)
    for stage in stage_registry.stages().values():
        if stage.config is not None:
            _check_section(stage.section, stage.view(config), config, refuse, world_size)


def _check_section(section: str, view, config: Config, refuse, world_size: int) -> None:
    """A declared section: its ranges and choices, then its own cross-checks on `view` (a stage's view of the
    config, or the whole config for a data source's section)."""
    values = getattr(config, section)
    check_values(section, values, getattr(values, "RANGES", {}), refuse)
    if hasattr(values, "check"):
        values.check(view, refuse, world_size)


def check_sources(stage, config: Config, sources: dict) -> None:
    """Once the sources a stage reads are open (the labeled set's size known even when data.num_labeled = 0),
    the stage's own checks against them, before the first stage of the run starts."""
    values = getattr(config, stage.section, None)
    if stage.config is not None and isinstance(values, stage.config) and hasattr(values, "check_sources"):
        values.check_sources(stage.view(config), sources)


def check_device_here(config: Config) -> None:
    """For `run` only (`status` and `report` may plan on a login node without the run's GPUs): refuse a
    CUDA device this machine does not have before anything is created, not as a traceback once a stage
    moves its model. Imports torch, which the run is about to import anyway."""
    device = config.run.device
    if not device.startswith("cuda"):
        return
    import torch

    # Plain "cuda" is cuda:LOCAL_RANK under torchrun (ml.devices.resolve_device).
    index = int(device.partition(":")[2] or dist_info().local_rank)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index < count:
        return
    have = (f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else
            "no CUDA device" + (" (this torch is a CPU-only build)" if torch.version.cuda is None else ""))
    raise UserError(f"`run.device` is {device!r}" + ("" if ":" in device else f" (cuda:{index} for this process)")
                    + f", but this machine has {have}. Use --set run.device=auto (CUDA when present, else the "
                    "CPU) or --set run.device=cpu" + (f", a device index below {count}" if count else "")
                    + ", or run it where the GPU is.")


def _value(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)
