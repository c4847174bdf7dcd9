"""The config's checks: every value's range and the values against each other (and the training batches
against torchrun's world size), each refusal a UserError naming the key, its value, where it was set
and the fix. Run by `load_config` after the overrides. Every section, the engine's, the data sources'
and the stages', is checked the same way: the `RANGES` its dataclass declares (pipeline.core.checks),
then its own `check`; `check_sources` once the sources a stage reads are open. No torch here: `status`
must stay quick.

`config` is a pipeline.config.Config throughout; this module does not import it (config.py imports this
one), and needs only its sections as attributes.
"""
from __future__ import annotations

from typing import Any

from pipeline import stage_registry
from pipeline.core.checks import check_values
from pipeline.core.distributed import dist_info
from pipeline.core.errors import UserError


def validate(config: Any, *, world_size: int | None = None, sources: dict[str, str] | None = None) -> None:
    """Refuse, with a UserError naming the key, its value and the fix, any value a stage would crash on or
    silently misuse. `world_size` defaults to torchrun's WORLD_SIZE (1 without torchrun); `sources` maps
    "section.key" to where the value was set, for the message."""
    world_size = dist_info().world_size if world_size is None else world_size

    def refuse(key: str, problem: str, fix: str) -> UserError:
        where = "" if sources is None else f" (set by {sources[key]})" if key in sources else " (the default)"
        fix = fix or f"Change it in the [{key.split('.')[0]}] section of the config file, or with --set {key}=VALUE."
        return UserError(f"`{key}` is {_value(config, key)!r}{where}; {problem}. {fix}")

    # A stage's section is checked on the stage's view of the config; the engine's and the data sources'
    # sections see the whole config.
    stage_of = {stage.section: stage for stage in stage_registry.stages().values() if stage.config is not None}
    for section in config.section_names():
        view = stage_of[section].view(config) if section in stage_of else config
        _check_section(section, view, config, refuse, world_size)


def _check_section(section: str, view: Any, config: Any, refuse, world_size: int) -> None:
    """A section: its declared ranges and choices, then its own cross-checks on `view`."""
    values = getattr(config, section)
    check_values(section, values, getattr(values, "RANGES", {}), refuse)
    if hasattr(values, "check"):
        values.check(view, refuse, world_size)


def check_sources(stage, config: Any, sources: dict) -> None:
    """Once the sources a stage reads are open (the labeled set's size known even when data.num_labeled = 0),
    the stage's own checks against them, before the first stage of the run starts."""
    values = getattr(config, stage.section, None)
    if stage.config is not None and isinstance(values, stage.config) and hasattr(values, "check_sources"):
        values.check_sources(stage.view(config), sources)


def check_device_here(config: Any) -> None:
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


def _value(config: Any, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)
