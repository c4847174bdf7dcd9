"""A work dir remembers its config: `run` records the resolved config as `<workdir>/config.toml`, and
every command that takes --workdir plans with that record when no --config or --set is given.

The record is TOML that `load_config` reads back to an equal config: every key of every section,
defaults included, so it still means the same run when a shipped config or a default changes.
Relative paths in it (pool.path, data.root) are as they were given, relative to where `run` ran.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_write_text
from pipeline.core.errors import UserError

RECORD_NAME = "config.toml"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def record_path(workdir: Path) -> Path:
    return Path(workdir) / RECORD_NAME


def dump_config(config) -> str:
    """The config as TOML: one [section] per section of the config, every key, in declaration order."""
    lines = []
    for name in config.section_names():
        lines.append(f"[{_key(name)}]")
        lines += [f"{_key(key)} = {_value(value)}" for key, value in config.section(name).items()]
        lines.append("")
    return "\n".join(lines)


def record_config(workdir: Path, config) -> Path:
    """Write `<workdir>/config.toml` (temp name, then rename): the config this run resolved."""
    path = record_path(workdir)
    atomic_write_text(path, "# The resolved config of the last `python -m pipeline run` in this work dir; `status`,\n"
                            "# `report` and every command given this --workdir and no --config/--set use it.\n"
                            + dump_config(config))
    return path


def choose_config(config_path, overrides, workdir: Path, *, use_record: bool = True):
    """(config, note): the work dir's record when neither --config nor --set is given and it has one,
    else --config (default configs/demo.toml) with the overrides. The note says which config was used
    when that is not plain: the record, or another config than the recorded one.

    `run` passes use_record=False: what it runs is what was typed (`run` after `run --set mart.beta=3`
    is the demo again), and the note says that it replaces a different record."""
    from pipeline.config import DEFAULT_CONFIG, load_config

    record = record_path(workdir)
    if use_record and not config_path and not overrides and record.is_file():
        try:
            return load_config(record), f"using the config recorded in {record}"
        except UserError as e:
            raise UserError(f"{e} That file is the config `run` recorded in the work dir {workdir}; fix or "
                            f"delete it, or name the config with --config.") from None
    config = load_config(config_path, overrides)
    if not record.is_file():
        return config, ""
    try:
        recorded = dump_config(load_config(record))
    except UserError:
        recorded = None
    if recorded == dump_config(config):
        return config, ""
    given = " ".join([str(config_path or DEFAULT_CONFIG)] + [f"--set {o}" for o in overrides])
    if not use_record:
        return config, f"running {given}, which replaces the different config recorded in {record}"
    return config, (f"comparing against {given}, not the config recorded in {record}"
                    + ("" if recorded is not None else " (which cannot be read)")
                    + "; give no --config/--set to use the recorded one")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return repr(value)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        # JSON's escapes are TOML basic-string escapes (non-ASCII kept: JSON would write surrogate pairs)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"config value {value!r} ({type(value).__name__}) has no TOML form")
