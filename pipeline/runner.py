"""The stage graph and make-like staleness over the stage store.

A stage's fingerprint is sha256 over its name, version, significant parameters and its inputs'
fingerprints (upstream stages and data sources, as it declares them). It is fresh when the store holds
an entry for that fingerprint whose recorded outputs are all there; `run` also checks their digests
before anything is reused. A stage is built in `<fingerprint>.partial/` under the entry's lock; only
after its outputs are complete does the runner write `stage.json` and rename the directory into place,
so a killed stage never looks done, and its resume state is reused only by the same fingerprint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline import shard_jobs, stage_registry
from pipeline.config import Config
from pipeline.config_checks import check_sources
from pipeline.core import distributed, host_memory, locks
from pipeline.core.atomic import atomic_write_json
from pipeline.core.errors import UserError, storage_errors
from pipeline.core.fingerprint import fingerprint
from pipeline.launchers import Launcher
from pipeline.stage import Source, Stage, StageContext, StageInput
from pipeline.store import Store, check_outputs, output_digest, read_record, store_dir
from pipeline.workdir_record import record_config

WORKDIR_LOCK = ".lock"


@dataclass
class StagePlan:
    stage: Stage
    fingerprint: str
    params: dict[str, Any]
    inputs: dict[str, str]  # input name (upstream stage or source) -> its fingerprint
    fresh: bool
    reason: str  # why it is stale, or "fresh"
    entry: Path  # where its outputs are (fresh) or will be (stale)


class Runner:
    def __init__(self, config: Config, workdir: Path, *, log: Callable[[str], None] = print,
                 stages: dict[str, Stage] | None = None, world_size: int | None = None,
                 launcher: Launcher | None = None):
        self.config = config
        # Where the shards of a sharded stage are made (pipeline.launchers): None or serial, in this process.
        self.launcher = launcher
        # The processes the stages run on: torchrun's (from the environment) unless a launcher plans for
        # jobs of another size than the process planning (a SLURM sweep's multi-task variants).
        self.world_size = world_size
        self.workdir = Path(workdir)
        self.log = log
        self.stages = stages if stages is not None else stage_registry.stages()
        self.store = Store(store_dir(config.run.store, self.workdir))
        self._source_fingerprints: dict[str, str] = {}
        self._opened: dict[str, Any] = {}

    # -- planning: declarations and the store only; no data source is opened ----------------------
    def closure(self, names: list[str]) -> list[str]:
        """The named stages and everything they require, each after its upstream stages."""
        return stage_registry.in_graph_order(self.stages, names, self.config)

    def default_stages(self) -> list[str]:
        return stage_registry.default_stages(self.stages)

    def source_fingerprint(self, source: Source) -> str:
        if source.name not in self._source_fingerprints:
            self._source_fingerprints[source.name] = source.fingerprint(self.config)
        return self._source_fingerprints[source.name]

    def plan(self, names: list[str], *, verify: bool = False) -> list[StagePlan]:
        """Each stage's fingerprint and whether it is fresh (with `verify`, output digests checked too)."""
        plans: dict[str, StagePlan] = {}
        for name in self.closure(names):
            stage = self.stages[name]
            inputs = {up: plans[up].fingerprint for up in stage.upstream(self.config)}
            for source in stage.sources(self.config):
                inputs[source.name] = self.source_fingerprint(source)
            params = stage.params(self.config)
            world_size = self.world_size or distributed.dist_info().world_size
            if stage.distributed_changes_results and world_size != 1:  # absent at 1: old entries stay valid
                params.update({"run.world_size": world_size, "run.sync_bn": self.config.run.sync_bn})
            fp = fingerprint({"stage": name, "code_version": stage.code_version, "params": params,
                              "inputs": inputs})
            entry, fresh, reason = self._freshness(stage, fp, params, inputs, verify=verify)
            plans[name] = StagePlan(stage, fp, params, inputs, fresh, reason, entry)
        return list(plans.values())

    def _freshness(self, stage: Stage, fp: str, params: dict, inputs: dict, *, verify: bool):
        """(entry, fresh, reason): the store's entry for `fp`, or the one the work dir links to if it
        has that fingerprint (a work dir made with another store); the reason names what changed."""
        linked = self.workdir / stage.name
        candidates = [self.store.entry(stage.name, fp)]
        if linked.exists() and linked.resolve() != candidates[0].resolve():
            candidates.append(linked.resolve())
        if candidates[0].is_symlink():  # never followed: the rebuild moves it aside (Store.commit)
            return candidates[0], False, "stale, the store's entry is a symbolic link, not a directory rst-mart wrote"
        for entry in candidates:
            record = read_record(entry)
            if record is None or record.get("fingerprint") != fp:
                continue
            problem = check_outputs(entry, record, verify=verify)
            if problem is None:
                self.store.mark_used(entry)  # gc's grace period counts from the last run, status or report
                return entry, True, "fresh"
            return candidates[0], False, f"stale, {problem}"
        current = read_record(linked)
        if current is None:
            return candidates[0], False, "missing"
        return candidates[0], False, _why_changed(current, stage.code_version, params, inputs)

    # -- running ------------------------------------------------------------------------------------
    def run(self, names: list[str], *, force: bool = False) -> list[StagePlan]:
        dist = distributed.dist_info()
        if dist.enabled:  # under torchrun: join the process group before the first collective
            distributed.init_process_group(distributed.device_type(self.config.run.device))
        # A missing dataset or a bad stage name fails before the work dir or the store is touched. This
        # plan decides nothing: the one that does comes after the work dir is registered and the store held.
        self.plan(names)
        with self._lock_workdir(dist, self.closure(names)):
            return self._run_locked(names, force=force, dist=dist)

    def _lock_workdir(self, dist, stage_names: list[str]) -> contextlib.ExitStack:
        """Rank 0, before anything in the work dir or the store moves: refuse a work dir inside the store
        (or the store inside a stage link's path) and a stage-named directory rst-mart did not write; then
        take the work dir's lock, the store's shared lock (gc takes it exclusively: it cannot remove an
        entry this run has planned to use), and register the work dir (gc keeps what it links to). Lock
        order: core/locks.py. Every rank learns whether it went through."""
        held, problem = contextlib.ExitStack(), None
        if dist.is_main:
            try:
                self.store.check_layout(self.workdir, stage_names)
                self.workdir.mkdir(parents=True, exist_ok=True)
                try:
                    held.enter_context(locks.exclusive(self.workdir / WORKDIR_LOCK))
                except locks.Locked as e:
                    raise UserError(
                        f"the work dir {self.workdir} is in use by another run ({e.holder}); wait for it to finish "
                        f"(`python -m pipeline status` shows its progress) or give this run its own --workdir. "
                        f"Stages it finishes are shared through the store.") from None
                for name in stage_names:
                    self.store.check_adoptable(self.workdir, name)
                self.store.check_writable()
                held.enter_context(locks.shared(self.store.lock_file, wait=True, on_wait=lambda who: self.log(
                    f"waiting for gc ({who}) to finish with the store {self.store.root}")))
                self.store.register(self.workdir)
            except UserError as e:
                held.close()
                problem = str(e)
            except BaseException:
                held.close()
                raise
        problem = distributed.broadcast_object(problem)
        if problem is not None:
            raise UserError(problem)
        return held

    def _run_locked(self, names: list[str], *, force: bool, dist) -> list[StagePlan]:
        if dist.is_main:
            self.store.check_writable()
        plans = self._agree(self.plan(names, verify=True))
        to_run = [p for p in plans if not p.fresh or (force and p.stage.name in names)]
        if to_run:  # a missing tensorboard/wandb fails now, not when a stage starts training
            self.config.log.check_installed()
        # Every source a running stage reads is opened and checked now, before the first stage starts:
        # a malformed pool fails in seconds, not after an hour of teacher training.
        for plan in to_run:
            for source in plan.stage.sources(self.config):
                self._open(source, dist)
        for plan in to_run:  # the stage's own checks against what the sources hold, e.g. the labeled set's size
            opened = {s.name: self._opened[s.name] for s in plan.stage.sources(self.config)}
            check_sources(plan.stage, self.config, opened)
        if dist.is_main:  # what status and report plan with later; not written by a run refused for its input
            record_config(self.workdir, self.config)
        for plan in plans:
            name = plan.stage.name
            if plan not in to_run:
                self.log(f"{name}: cached")
            else:
                why = "forced" if plan.fresh else plan.reason
                needed_by = "" if name in names else " (needed upstream)"
                self.log(f"{name}: {why}, running{needed_by}")
                seconds = self._build(plan, plans, force=force and name in names, dist=dist)
                self.log(f"{name}: ran in {seconds:.1f}s" if seconds is not None
                         else f"{name}: cached (built meanwhile by another process)")
            if dist.is_main:
                plan.entry = self.store.link(self.workdir, name, plan.entry)
        distributed.barrier()
        return plans

    def _open(self, source: Source, dist) -> Any:
        if source.name not in self._opened:
            # Under torchrun rank 0 opens first, so a download or a pool conversion happens once, not once
            # per rank into the same files; the others then find them done.
            if not dist.is_main:
                distributed.barrier()
            self._opened[source.name] = source.open(self.config, self.store.root / "sources")
            if dist.is_main:
                distributed.barrier()
        return self._opened[source.name]

    @staticmethod
    def _agree(plans: list[StagePlan]) -> list[StagePlan]:
        """Rank 0's staleness decisions on every rank. Each rank reads the store itself, and a rank
        that looks while rank 0 is already renaming a directory would decide otherwise and skip a
        stage the others run: every collective after that would hang."""
        decided = distributed.broadcast_object([(p.stage.name, p.fingerprint, p.fresh, p.reason) for p in plans])
        for plan, (name, fp, fresh, reason) in zip(plans, decided):
            if (name, fp) != (plan.stage.name, plan.fingerprint):
                raise UserError(f"rank {distributed.dist_info().rank} computed fingerprint {plan.fingerprint[:16]} "
                                f"for stage {plan.stage.name} but rank 0 computed {fp[:16]} for {name}: the "
                                f"ranks see different configs, code or data; give every node the same ones.")
            plan.fresh, plan.reason = fresh, reason
        return plans

    def _build(self, plan: StagePlan, plans: list[StagePlan], *, force: bool, dist) -> float | None:
        """Build the entry under its lock; None when another process finished it while we waited."""
        stage, store = plan.stage, self.store
        held = None
        if dist.is_main:
            held = locks.exclusive(store.lock_path(stage.name, plan.fingerprint), wait=True,
                                   on_wait=lambda who: self.log(f"{stage.name}: waiting for {who}, which is "
                                                                f"building the same entry"))
            held.__enter__()
        try:
            built_meanwhile = False
            if dist.is_main and not force:
                record = read_record(plan.entry)
                built_meanwhile = (not plan.entry.is_symlink() and record is not None
                                   and record.get("fingerprint") == plan.fingerprint
                                   and check_outputs(plan.entry, record, verify=True) is None)
            if distributed.broadcast_object(built_meanwhile):
                plan.fresh, plan.reason = True, "fresh"
                return None
            return self._run_stage(plan, plans, force=force, dist=dist)
        finally:
            if held is not None:
                held.__exit__(None, None, None)

    def _run_stage(self, plan: StagePlan, plans: list[StagePlan], *, force: bool, dist) -> float:
        stage = plan.stage
        partial = self.store.partial(stage.name, plan.fingerprint)
        if dist.is_main:
            with storage_errors(partial):
                if force and partial.exists():
                    shutil.rmtree(partial)
                partial.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        by_name = {p.stage.name: p for p in plans}
        ctx = StageContext(
            config=stage.view(self.config), out_dir=partial, fingerprint=plan.fingerprint, dist=dist, log=self.log,
            live_log=self.config.log,
            inputs={up: StageInput(by_name[up].entry, by_name[up].fingerprint) for up in stage.upstream(self.config)},
            sources={s.name: self._open(s, dist) for s in stage.sources(self.config)})
        host_memory.keep_freed_memory()
        start = time.perf_counter()
        try:
            if stage.shards is not None:
                self._run_sharded(plan, ctx, dist)
            else:
                stage.run(ctx)
        except UserError:
            if dist.is_main:  # refused before writing anything (an input that does not fit): leave nothing behind
                with contextlib.suppress(OSError):
                    partial.rmdir()  # only an empty directory goes: resume state stays
            raise
        seconds = time.perf_counter() - start
        host_memory.release_free_memory()
        distributed.barrier()
        if dist.is_main:
            self._commit(plan, partial, seconds)
        distributed.barrier()
        plan.fresh, plan.reason = True, "fresh"
        return seconds

    def _run_sharded(self, plan: StagePlan, ctx: StageContext, dist) -> None:
        """A sharded stage: its shards made by every torchrun rank or by the launcher's jobs, then the stage run
        once more here (on rank 0 alone) with shard=None, which makes any shard still missing and writes the
        final outputs. A failed job stops the run (UserError) with its shards kept for the rerun."""
        stage = plan.stage
        if dist.enabled:
            stage.run(dataclasses.replace(ctx, shard=(dist.rank, dist.world_size)))
            distributed.barrier()
            if dist.is_main:
                stage.run(dataclasses.replace(ctx, dist=distributed.DistInfo()))
            return
        if self.launcher is not None and not self.launcher.in_process:
            shard_jobs.make_shards(self.launcher, plan.stage.name, plan.fingerprint, ctx.out_dir,
                                   count=stage.shards(ctx.config), workdir=self.workdir, store=self.store.root,
                                   log=self.log)
        stage.run(ctx)

    def make_shards(self, names: list[str], shard: tuple[int, int], *, expected: str | None = None) -> None:
        """`run --shard I/N`: make shard I of N of one sharded stage (the shards s with s % N == I that are
        missing) into its entry's partial directory, under the store's shared lock, and commit nothing: the
        run that launched the job (or a later plain `run`) commits it. Its upstream stages must be fresh.
        Takes no work dir lock and writes nothing in the work dir: its launching run holds and owns it."""
        if distributed.dist_info().enabled:
            raise UserError("--shard is for one process; under torchrun every rank already makes its own shards "
                            "(drop --shard).")
        stage = self.stages.get(names[0]) if len(names) == 1 else None
        if stage is None or stage.shards is None:
            raise UserError(f"--shard needs --stages naming one sharded stage (got {','.join(names)}); a sharded "
                            f"stage declares Stage(shards=...). Run other stages without --shard.")
        index, count = shard
        if not 0 <= index < count:
            raise UserError(f"--shard {index}/{count}: the index must be from 0 to {count - 1}.")
        plans = self.plan(names, verify=True)
        plan, stale = plans[-1], [p for p in plans[:-1] if not p.fresh]
        if stale:
            raise UserError(f"--shard makes shards of {stage.name} only, but its upstream stage "
                            f"{stale[0].stage.name} is {stale[0].reason}; run that first (the same command "
                            f"without --shard runs everything).")
        if expected is not None and plan.fingerprint != expected:
            raise UserError(f"this job computed fingerprint {plan.fingerprint[:16]} for stage {stage.name}, but the "
                            f"run that launched it {expected[:16]}: the job sees other code, config or data; give "
                            f"every node the same ones.")
        if plan.fresh:
            self.log(f"{stage.name}: cached")
            return
        dist = distributed.dist_info()
        with locks.shared(self.store.lock_file, wait=True, on_wait=lambda who: self.log(
                f"waiting for gc ({who}) to finish with the store {self.store.root}")):
            sources = {s.name: self._open(s, dist) for s in stage.sources(self.config)}
            check_sources(stage, self.config, sources)
            partial = self.store.partial(stage.name, plan.fingerprint)
            with storage_errors(partial):
                partial.mkdir(parents=True, exist_ok=True)
            by_name = {p.stage.name: p for p in plans}
            ctx = StageContext(
                config=stage.view(self.config), out_dir=partial, fingerprint=plan.fingerprint, dist=dist,
                log=self.log, live_log=self.config.log, sources=sources, shard=(index, count),
                inputs={up: StageInput(by_name[up].entry, by_name[up].fingerprint)
                        for up in stage.upstream(self.config)})
            start = time.perf_counter()
            stage.run(ctx)
        self.log(f"{stage.name}: made shards {index}/{count} in {time.perf_counter() - start:.1f}s")

    def _commit(self, plan: StagePlan, partial: Path, seconds: float) -> None:
        stage = plan.stage
        outputs = {}
        for name in stage.output_names(self.config):
            path = partial / name
            if not path.exists():
                raise RuntimeError(f"stage {stage.name} finished without writing its declared output {name}")
            outputs[name] = output_digest(path)
        atomic_write_json(partial / "stage.json", {
            "stage": stage.name,
            "fingerprint": plan.fingerprint,
            "params": plan.params,
            "inputs": plan.inputs,
            "code_version": stage.code_version,
            "seconds": round(seconds, 3),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "outputs": outputs,
        })
        with storage_errors(plan.entry):
            plan.entry = self.store.commit(stage.name, plan.fingerprint, partial, log=self.log)


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


def run_in_progress(workdir: Path) -> str | None:
    """Who is running in `workdir` now (for `status`), or None."""
    return locks.held_by(Path(workdir) / WORKDIR_LOCK)
