"""The config's checks: every value's range and the values against each other (and the training batches
against torchrun's world size), each refusal a UserError naming the key, its value, where it was set
and the fix. Run by `load_config` after the overrides; the engine's sections are checked here, each
stage's section by the ranges and checks its dataclass declares; `check_sources` once the sources a
stage reads are open. No torch here: `status` must stay quick."""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from pipeline import registry
from pipeline.core.checks import check_values
from pipeline.core.distributed import dist_info
from pipeline.core.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import Config

_CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),  # and cuda:N
    "run.precision": ("fp32", "bf16", "fp16", "auto"),
}

_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")

# Every number's allowed range in the engine's sections, with what the value means where that helps to
# choose a fix. The stages' sections declare theirs (RANGES on their dataclass).
_RANGES = {
    "run.seed": (*_AT_LEAST_0, ""),
    "run.num_workers": (*_AT_LEAST_0, ""),
    "run.checkpoint_every_s": (*_AT_LEAST_0, "seconds between mid-epoch checkpoints; 0 = after every step"),
    "data.num_labeled": (*_AT_LEAST_0, "0 = the whole training split"),
    "pool.limit": (*_AT_LEAST_0, "0 = the whole pool"),
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
    for stage in registry.stages().values():
        if stage.config is not None:
            _check_stage_section(stage, config, refuse, world_size)


def _check_stage_section(stage, config: Config, refuse, world_size: int) -> None:
    """A stage's section: its declared ranges and choices, then its own cross-checks on its view of the config."""
    values = getattr(config, stage.section)
    check_values(stage.section, values, getattr(values, "RANGES", {}), refuse)
    if hasattr(values, "check"):
        values.check(stage.view(config), refuse, world_size)


def check_sources(stage, config: Config, sources: dict) -> None:
    """Once the sources a stage reads are open (the labeled set's size known even when data.num_labeled = 0),
    the stage's own checks against them, before the first stage of the run starts."""
    values = getattr(config, stage.section, None)
    if stage.config is not None and isinstance(values, stage.config) and hasattr(values, "check_sources"):
        values.check_sources(stage.view(config), sources)


def _value(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)
