"""Where stages come from: the built-in modules of the `stages` package and the entry-point group
`rst_mart.stages` (each entry point names a `Stage`), found, not listed. The order stages run in
comes from their declared upstream inputs, not from this registry.

The built-ins are found by walking the `stages` package, not through installed metadata, so a fresh
clone run from source finds them. Importing a stage module is light (heavy imports live inside its
`run`), so `status` pays only for the declarations.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import pkgutil
from types import SimpleNamespace

from pipeline.core.errors import UserError
from pipeline.stage import Stage

ENTRY_POINT_GROUP = "rst_mart.stages"
BUILTIN_PACKAGE = "stages"


@functools.cache
def stages() -> dict[str, Stage]:
    """Every stage by name: the built-ins, then the plug-ins (a plug-in may not reuse a name or a section)."""
    found: dict[str, Stage] = {}
    for stage, origin in [*_builtin(), *_plugins()]:
        clash = next((s for s in found.values() if stage.name == s.name or stage.section == s.section), None)
        if clash is not None:
            raise UserError(f"the stage {stage.name!r} from {origin} uses the name or config section "
                            f"[{stage.section}] of the stage {clash.name!r} already registered; rename it in "
                            f"its Stage(...) or uninstall one of the two.")
        found[stage.name] = stage
    return _in_default_graph_order(found)


def _in_default_graph_order(found: dict[str, Stage]) -> dict[str, Stage]:
    """The registry in the order its stages run with default settings, so listings (the config's
    sections, `unknown stage` messages) read upstream first."""
    from pipeline.config import ENGINE_SECTIONS  # here: pipeline.config composes its sections from this registry
    from pipeline.library import source_sections

    # Every section at its defaults, the engine's and the sources' too: a stage's inputs may depend on [pool]
    # (pseudolabel's do).
    sections = {**ENGINE_SECTIONS, **{name: source.config for name, source in source_sections().items()},
                **{s.section: s.config for s in found.values() if s.config is not None}}
    defaults = SimpleNamespace(**{name: kind() for name, kind in sections.items()})
    order: list[str] = []
    for name in found:
        try:
            order += [n for n in in_graph_order(found, [name], defaults) if n not in order]
        except (AttributeError, KeyError, UserError):  # inputs() that need more than the defaults, or a stage
            continue  # whose upstream is not installed: kept, after the others, as found
    return {name: found[name] for name in [*order, *(n for n in found if n not in order)]}


def _builtin() -> list[tuple[Stage, str]]:
    package = importlib.import_module(BUILTIN_PACKAGE)
    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{BUILTIN_PACKAGE}.{info.name}")
        stage = getattr(module, "STAGE", None)  # helper modules of the package declare none
        if isinstance(stage, Stage):
            found.append((stage, module.__name__))
    return found


def _plugins() -> list[tuple[Stage, str]]:
    found = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            stage = ep.load()
        except (ImportError, AttributeError) as e:
            raise UserError(f"the entry point {ep.name} = {ep.value!r} in group {ENTRY_POINT_GROUP} cannot be "
                            f"loaded ({e}); reinstall the package that provides it, or uninstall it.") from None
        if not isinstance(stage, Stage):
            raise UserError(f"the entry point {ep.name} = {ep.value!r} in group {ENTRY_POINT_GROUP} names a "
                            f"{type(stage).__name__}, not a pipeline.stage.Stage; point it at the module's STAGE.")
        found.append((stage, f"entry point {ep.value}"))
    return found


def default_stages(registered: dict[str, Stage]) -> list[str]:
    """What `run` runs without --stages: the stages that declare `default=True`."""
    return [name for name, stage in registered.items() if stage.default]


def in_graph_order(registered: dict[str, Stage], names: list[str], config) -> list[str]:
    """`names` and every stage they need, each after its upstream stages (depth first, in the order the
    names and each stage's inputs are given, so the order is stable)."""
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise UserError(f"unknown stage {', '.join(unknown)}; the stages are {', '.join(registered)} "
                        f"(the default is --stages {','.join(default_stages(registered))}).")
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise UserError(f"the stages' declared inputs form a cycle ({cycle}); a stage cannot need itself. "
                            "Fix the inputs of one of them.")
        if name not in registered:
            raise UserError(f"stage {visiting[-1]} needs the stage {name!r}, which is not registered; install "
                            f"the package that provides it (the stages are {', '.join(registered)}).")
        visiting.append(name)
        for upstream in registered[name].upstream(config):
            visit(upstream)
        visiting.pop()
        order.append(name)

    for name in names:
        visit(name)
    return order
