"""The stage graph and make-like staleness.

A stage is fresh when `<workdir>/<stage>/stage.json` records the fingerprint the stage would have now
and every declared output exists with its recorded size. A stage runs in `<stage>.partial/`; only after
its outputs are complete does the runner write `stage.json` and rename the directory into place, so a
killed stage never looks done, and its resume state (in the partial directory, tagged with the
fingerprint) is reused only by a run with the same fingerprint.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pipeline import distributed
from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.fingerprint import file_digest, fingerprint

DEFAULT_STAGES = ("teacher", "pseudolabel", "mart")
_DIGEST_LIMIT_BYTES = 256 << 20  # outputs above this are recorded by size and mtime, not sha256


@dataclass(frozen=True)
class Stage:
    """What a stage declares; `run(ctx)` writes `outputs` into `ctx.out_dir`."""

    name: str
    version: int  # bump when the meaning of the stage's output changes
    section: str  # its config section
    outputs: tuple[str, ...]
    run: Callable[["StageContext"], None]
    requires: Callable[[Config], tuple[str, ...]] = lambda config: ()
    insignificant: tuple[str, ...] = ()  # keys of its own section that do not change results
    extra_params: tuple[str, ...] = ()  # "section.key" of other sections that do change results
    uses_pool: bool = False

    @property
    def code_version(self) -> str:
        return f"{self.name}/v{self.version}"

    def params(self, config: Config) -> dict[str, Any]:
        own = {k: v for k, v in config.section(self.section).items() if k not in self.insignificant}
        params = {self.section: own}
        for dotted in self.extra_params:
            section, key = dotted.split(".")
            params[dotted] = config.section(section)[key]
        return params


@dataclass
class StageContext:
    """Everything a stage may read: the config, its upstream directories, the opened data sources."""

    config: Config
    out_dir: Path  # the partial directory the stage writes into
    inputs: dict[str, Path]  # upstream stage name -> its finished directory
    data: Any  # data.sources.DataSources: labeled set, split, pool
    fingerprint: str
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)
    log: Callable[[str], None] = print


@dataclass
class StagePlan:
    stage: Stage
    fingerprint: str
    params: dict[str, Any]
    inputs: dict[str, str]
    fresh: bool
    reason: str  # why it is stale, or "fresh"


def load_stages() -> dict[str, Stage]:
    """The stage registry (imported here, not at module import, so `pipeline` stays light)."""
    from stages import STAGES

    return STAGES


class Runner:
    def __init__(self, config: Config, workdir: Path, *, log: Callable[[str], None] = print,
                 stages: dict[str, Stage] | None = None, data=None):
        self.config = config
        self.workdir = Path(workdir)
        self.log = log
        self.stages = stages if stages is not None else load_stages()
        self._data = data

    # -- data sources are opened once, before any stage runs, so bad input fails in seconds ----------
    def data(self, need_pool: bool):
        if self._data is None:
            from data.sources import open_sources

            # Under torchrun rank 0 opens first, so a download or a pool conversion happens once, not
            # once per rank into the same files; the others then find them done.
            main = distributed.dist_info().is_main
            if not main:
                distributed.barrier()
            self._data = open_sources(self.config, need_pool=need_pool)
            if main:
                distributed.barrier()
        elif need_pool:
            self._data.ensure_pool()
        return self._data

    def closure(self, names: list[str]) -> list[str]:
        """The named stages and everything they require, in execution order."""
        unknown = [n for n in names if n not in self.stages]
        if unknown:
            raise UserError(f"unknown stage {', '.join(unknown)}; the stages are {', '.join(self.stages)} "
                            f"(for example --stages teacher,pseudolabel,mart).")
        needed: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in needed:
                needed.add(name)
                todo.extend(self.stages[name].requires(self.config))
        return [n for n in self.stages if n in needed]

    def plan(self, names: list[str]) -> list[StagePlan]:
        order = self.closure(names)
        data = self.data(need_pool=any(self.stages[n].uses_pool for n in order))
        plans: dict[str, StagePlan] = {}
        for name in order:
            stage = self.stages[name]
            inputs = {"labeled": data.fingerprint()}
            if stage.uses_pool:
                inputs["pool"] = data.pool.fingerprint()
            for upstream in stage.requires(self.config):
                inputs[upstream] = plans[upstream].fingerprint
            params = stage.params(self.config)
            fp = fingerprint({"stage": name, "code_version": stage.code_version, "params": params,
                              "inputs": inputs})
            fresh, reason = self._freshness(stage, fp, params, inputs)
            plans[name] = StagePlan(stage, fp, params, inputs, fresh, reason)
        return list(plans.values())

    def _freshness(self, stage: Stage, fp: str, params: dict, inputs: dict) -> tuple[bool, str]:
        """Cheapest checks first; the reason names what changed."""
        record_path = self.workdir / stage.name / "stage.json"
        if not record_path.exists():
            return False, "missing"
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return False, "stage.json unreadable"
        if record.get("fingerprint") != fp:
            return False, _why_changed(record, stage.code_version, params, inputs)
        for name, meta in record.get("outputs", {}).items():
            path = self.workdir / stage.name / name
            if not path.exists():
                return False, f"output {name} missing"
            if path.stat().st_size != meta.get("size"):
                return False, f"output {name} changed size"
        return True, "fresh"

    def run(self, names: list[str], *, force: bool = False) -> list[StagePlan]:
        dist = distributed.dist_info()
        if dist.enabled:  # under torchrun: join the process group before the first barrier
            distributed.init_process_group(distributed.device_type(self.config.run.device))
        plans = self._agree(self.plan(names))
        for plan in plans:
            name = plan.stage.name
            if plan.fresh and not (force and name in names):
                self.log(f"{name}: cached")
                continue
            why = "forced" if plan.fresh else plan.reason
            needed_by = "" if name in names else " (needed upstream)"
            self.log(f"{name}: {why}, running{needed_by}")
            seconds = self._run_stage(plan, force=force and name in names, dist=dist)
            self.log(f"{name}: ran in {seconds:.1f}s")
        return plans

    @staticmethod
    def _agree(plans: list[StagePlan]) -> list[StagePlan]:
        """Rank 0's staleness decisions on every rank. Each rank reads the work dir itself, and a rank
        that looks while rank 0 is already removing or renaming a directory would decide otherwise and
        skip a stage the others run: every collective after that would hang."""
        decided = distributed.broadcast_object([(p.stage.name, p.fingerprint, p.fresh, p.reason) for p in plans])
        for plan, (name, fp, fresh, reason) in zip(plans, decided):
            if (name, fp) != (plan.stage.name, plan.fingerprint):
                raise UserError(f"rank {distributed.dist_info().rank} computed fingerprint {plan.fingerprint[:16]} "
                                f"for stage {plan.stage.name} but rank 0 computed {fp[:16]} for {name}: the "
                                f"ranks see different configs, code or data; give every node the same ones.")
            plan.fresh, plan.reason = fresh, reason
        return plans

    def _run_stage(self, plan: StagePlan, *, force: bool, dist) -> float:
        stage = plan.stage
        final_dir = self.workdir / stage.name
        partial = self.workdir / f"{stage.name}.partial"
        marker = partial / ".fingerprint"
        if dist.is_main:
            resumable = marker.exists() and marker.read_text().strip() == plan.fingerprint and not force
            if not resumable and partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True, exist_ok=True)
            atomic_write_text(marker, plan.fingerprint + "\n")
        distributed.barrier()
        inputs = {up: self.workdir / up for up in stage.requires(self.config)}
        ctx = StageContext(config=self.config, out_dir=partial, inputs=inputs,
                           data=self.data(need_pool=stage.uses_pool), fingerprint=plan.fingerprint,
                           dist=dist, log=self.log)
        start = time.perf_counter()
        stage.run(ctx)
        seconds = time.perf_counter() - start
        distributed.barrier()
        if dist.is_main:
            self._commit(plan, partial, final_dir, seconds)
        distributed.barrier()
        return seconds

    def _commit(self, plan: StagePlan, partial: Path, final_dir: Path, seconds: float) -> None:
        stage = plan.stage
        outputs = {}
        for name in stage.outputs:
            path = partial / name
            if not path.exists():
                raise RuntimeError(f"stage {stage.name} finished without writing its declared output {name}")
            size = path.stat().st_size
            outputs[name] = ({"size": size, "sha256": file_digest(path)} if size <= _DIGEST_LIMIT_BYTES
                             else {"size": size, "mtime_ns": path.stat().st_mtime_ns})
        atomic_write_json(partial / "stage.json", {
            "stage": stage.name,
            "fingerprint": plan.fingerprint,
            "params": plan.params,
            "inputs": plan.inputs,
            "code_version": stage.code_version,
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "outputs": outputs,
        })
        (partial / ".fingerprint").unlink()
        # Swap in two renames; a kill between them leaves no `<stage>/`, which reads as missing (rerun),
        # never as a half-written stage that looks done.
        old = self.workdir / f"{stage.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if final_dir.exists():
            final_dir.rename(old)
        partial.rename(final_dir)
        if old.exists():
            shutil.rmtree(old)


def _why_changed(record: dict, code_version: str, params: dict, inputs: dict) -> str:
    if record.get("code_version") != code_version:
        return f"stale, code version changed ({record.get('code_version')} -> {code_version})"
    changes = []
    old_params = _flatten(record.get("params", {}))
    for key, value in _flatten(params).items():
        if old_params.get(key, "<unset>") != value:
            changes.append(f"{key} changed ({old_params.get(key, '<unset>')} -> {value})")
    for key in old_params.keys() - _flatten(params).keys():
        changes.append(f"{key} removed")
    for key, value in inputs.items():
        if record.get("inputs", {}).get(key) != value:
            changes.append(f"input {key} changed")
    return "stale, " + ("; ".join(changes) if changes else "fingerprint changed")


def _flatten(params: dict) -> dict[str, Any]:
    flat = {}
    for section, values in params.items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v
        else:
            flat[section] = values
    return flat


def default_workdir(config_path: str | Path | None) -> Path:
    from pipeline.config import DEFAULT_CONFIG

    return Path("runs") / Path(config_path or DEFAULT_CONFIG).stem


def results_table(workdir: Path, names: list[str]):
    """All results.csv rows of the given stages as one DataFrame (empty when none exist yet)."""
    import pandas as pd

    frames = []
    for name in names:
        path = Path(workdir) / name / "results.csv"
        if path.exists():
            frame = pd.read_csv(path)
            frame.insert(0, "stage", name)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

