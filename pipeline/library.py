"""What the engine takes from the library floors (data, ml), found by name when it is needed, never
imported: the engine's import statements reach only pipeline/core and pipeline/stage.py (checked by
tests/test_architecture.py), so importing it costs no torch and the floors stay one-way. Stages come
the same way, from pipeline/stage_registry.py.

- sources: the `Source` objects of `data.sources` that declare a config section ([data], [pool]);
- functions the library contributes to the engine's commands and public API: `export` (the CLI's
  `export`), `load_model` and `build_model` (`pipeline.load_model`, `pipeline.build_model`).
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

from pipeline.stage import Source

# Module-level Sources in these modules are found, not listed; those with a `config` declare a section.
SOURCE_MODULES = ("data.sources",)
# name -> "module:attribute" of the library function.
FUNCTIONS = {
    "export": "ml.checkpoints:export_checkpoint",
    "load_model": "ml.checkpoints:load_model",
    "build_model": "ml.models:build_model",
}


@functools.cache
def source_sections() -> dict[str, Source]:
    """Section name -> the source that declares it, in the order the modules define them."""
    found: dict[str, Source] = {}
    for module_name in SOURCE_MODULES:
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            if isinstance(value, Source) and value.config is not None:
                found[value.section] = value
    return found


def function(name: str) -> Callable[..., Any]:
    """The library function registered as `name` (importing its module: torch for the ml ones)."""
    module_name, _, attribute = FUNCTIONS[name].partition(":")
    return getattr(importlib.import_module(module_name), attribute)
