"""`sweep --launcher local|slurm`: the grid planned first, then every variant as a `pipeline run` job.

Through the Launcher interface only (pipeline.launchers): nothing here depends on which launcher runs
the jobs.

The stages two or more variants share are built by their own jobs before the variants start, so nothing
is built twice even with every variant running at once (the store's entry locks would also make a
second builder wait and then find the entry done). `launch.json` in the sweep dir records which job
runs each variant; `sweep --status` reads it, the scheduler and the store, and never blocks. The
store decides what is done: a job that exited 0 but left a stage stale is a failure, and a rerun
launches only the variants that are not done.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, Config, load_config
from pipeline.core.atomic import atomic_write_json
from pipeline.core.errors import UserError
from pipeline.launchers import Job, JobState, Launcher, Submitted, make_launcher, stage_lines, tail
from pipeline.runner import Runner
from pipeline.stage_registry import stages as registered_stages
from pipeline.store import store_dir
from pipeline.sweep_grid import _row, expand_grid, variant_name, write_table

LAUNCH_RECORD = "launch.json"  # in the sweep dir: which job ran (or runs) each variant


@dataclass
class Variant:
    name: str
    overrides: list[str]  # its --set items, the grid's values included
    config: Config
    workdir: Path
    world_size: int = 1  # processes per job: a multi-task SLURM job trains at another fingerprint than one process


def _variants(config_path, overrides: list[str], seeds: str, sweep_dir: Path):
    varied, grid = expand_grid(overrides, seeds)
    configs = [load_config(config_path, variant) for variant in grid]
    store = store_dir(configs[0].run.store, sweep_dir).resolve()
    launcher_keys = sorted({k for k in varied if k.startswith("launcher.")})
    if launcher_keys:
        raise UserError(f"--set {launcher_keys[0]} has several values, but [launcher] describes how every job "
                        f"is submitted; give it one value (or run one sweep per value).")
    variants = []
    for variant, config in zip(grid, configs):
        config.run.store = str(store)
        name = variant_name(variant, varied)
        variants.append(Variant(name, variant, config, sweep_dir / name))
    return varied, variants, store


def _plans(variant: Variant, names: list[str]):
    return Runner(variant.config, variant.workdir, log=lambda message: None, world_size=variant.world_size).plan(names)


def _done(plans, workdir: Path) -> bool:
    """Every stage fresh in the store and linked from the variant's work dir."""
    return all(p.fresh and (workdir / p.stage.name).resolve() == p.entry.resolve() for p in plans)


def plan_jobs(variants: list[Variant], names: list[str], config_path, store: Path) -> tuple[list[Job], list[Job]]:
    """(jobs building the stale stages two or more variants share, one job per variant).

    Each shared (stage, fingerprint) is given to the first variant that needs it; that variant's shared
    job runs `--stages` of just those (their upstream stages come along, built by it or found built)."""
    plans = {v.name: _plans(v, names) for v in variants}
    users = Counter((p.stage.name, p.fingerprint) for v in variants for p in plans[v.name] if not p.fresh)
    covered: set = set()
    shared, per_variant = [], []
    config = str(Path(config_path or DEFAULT_CONFIG).resolve())
    for v in variants:
        base = ["--config", config, "--workdir", str(v.workdir.resolve())]
        for item in v.overrides + [f"run.store={store}"]:
            base += ["--set", item]
        mine = [p.stage.name for p in plans[v.name]
                if users[(p.stage.name, p.fingerprint)] > 1 and (p.stage.name, p.fingerprint) not in covered]
        covered.update((p.stage.name, p.fingerprint) for p in plans[v.name] if p.stage.name in mine)
        if mine and set(mine) != {p.stage.name for p in plans[v.name]}:
            shared.append(Job(f"shared-{v.name}", "shared", tuple(base + ["--stages", ",".join(mine)])))
        per_variant.append(Job(v.name, "variant", tuple(base + ["--stages", ",".join(names)])))
    return shared, per_variant


def launch_sweep(config_path, overrides: list[str], names: list[str], sweep_dir: Path, *, seeds: str = "",
                 launcher: str = "local", jobs: int = 1, wait: bool = True, launcher_flags: dict | None = None,
                 log=print) -> int:
    """Run the variants as jobs of `launcher` (`local`: `jobs` processes here; `slurm`: job arrays); the
    exit status."""
    varied, variants, store = _variants(config_path, overrides, seeds, sweep_dir)
    launching = make_launcher(launcher, variants[0].config.launcher, folder=sweep_dir, jobs=jobs,
                              run_device=variants[0].config.run.device, flags=launcher_flags, log=log)
    launching.check()  # before anything is written: exit 2 with the fix (install submitit, fewer jobs)
    for v in variants:
        v.world_size = launching.world_size
    sweep_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for v in variants:
        if _done(_plans(v, names), v.workdir):
            log(f"{v.name}: done (every stage fresh in the store)")
        else:
            todo.append(v)
    shared, per_variant = plan_jobs(todo, names, config_path, store)
    finished = _launch(launching, sweep_dir, shared, per_variant, wait=wait or not launching.detaches, log=log)
    if finished is None:
        return EXIT_OK
    rows, failed = [], []
    for v in variants:
        plans = _plans(v, names)
        if _done(plans, v.workdir):
            rows.append(_row(v.overrides, varied, v.name, plans))
        else:
            failed.append(v.name)
    if rows:
        write_table(sweep_dir, rows, varied)
    log(f"sweep: {len(rows)} of {len(variants)} variants in {sweep_dir / 'sweep.csv'} and sweep.png")
    if failed:
        _print_failures(launching, _read_record(sweep_dir), failed, log=log)
        # A variant that never started takes its shared-stages job's status (a user error there: 2).
        shared_codes = {code for name, code in finished.items() if name.startswith("shared-") and code}
        codes = {finished.get(name, max(shared_codes, default=None)) for name in failed}
        return EXIT_USER if codes == {EXIT_USER} else EXIT_FAILED
    return EXIT_OK


EXIT_OK, EXIT_FAILED, EXIT_USER = 0, 1, 2


def _launch(launcher: Launcher, sweep_dir: Path, shared: list[Job], per_variant: list[Job], *, wait: bool,
            log) -> dict[str, int] | None:
    """Submit the shared-stages jobs, then the variants after them; with `wait`, follow them to the end and
    return each started job's exit status (where the launcher knows it), else None once submitted."""
    previous = _read_record(sweep_dir)
    known = {}
    if previous.get("launcher") == launcher.name and launcher.detaches:  # its jobs may still be queued
        known = {name: Submitted.from_record(name, job) for name, job in previous.get("jobs", {}).items()}
    record = {"launcher": launcher.name, **launcher.settings_record(),
              "jobs": {name: one.record() for name, one in known.items()}}
    queued = launcher.adopt(known)
    new_shared = launcher.submit([j for j in shared if j.name not in queued])
    after = new_shared + [one for one in queued.values() if one.kind == "shared"]
    new_variants = launcher.submit([j for j in per_variant if j.name not in queued], after=after)
    for one in new_shared + new_variants:
        record["jobs"][one.name] = one.record()
    atomic_write_json(sweep_dir / LAUNCH_RECORD, record)  # so that `sweep --status` sees the jobs at once
    if not wait:
        log(f"submitted; `python -m pipeline sweep --status` (same options) shows progress; logs in "
            f"{launcher.folder}")
        return None
    watched = [queued.get(j.name) or next(o for o in new_shared + new_variants if o.name == j.name)
               for j in shared + per_variant]
    stage_names = list(registered_stages())

    def on_change(one: Submitted, state: JobState) -> None:
        record["jobs"][one.name] = one.record()
        atomic_write_json(sweep_dir / LAUNCH_RECORD, record)
        log(f"== {one.name}: {state.text}")
        if not state.active:  # the stage lines of the job's run: what it built and what it found cached
            out = launcher.logs(one)[0]
            if out.exists():
                for line in stage_lines(out.read_text(errors="replace"), stage_names):
                    log(f"   {line}")

    states = launcher.wait(watched, on_change=on_change)
    return {name: state.exit_code for name, state in states.items() if state.exit_code is not None}


def _read_record(sweep_dir: Path) -> dict:
    path = sweep_dir / LAUNCH_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def _recorded(sweep_dir: Path, config) -> tuple[Launcher | None, dict, dict[str, Submitted]]:
    """(the launcher that ran the sweep, launch.json, its jobs) as the last launch recorded them."""
    record = _read_record(sweep_dir)
    jobs = {name: Submitted.from_record(name, job) for name, job in record.get("jobs", {}).items()}
    if not jobs:
        return None, record, jobs
    launcher = make_launcher(record["launcher"], config.launcher, folder=sweep_dir, run_device=config.run.device,
                             log=lambda message: None)
    return launcher, record, jobs


def sweep_status(config_path, overrides: list[str], names: list[str], sweep_dir: Path, *, seeds: str = "",
                 log=print) -> int:
    """Each variant's state from the store and from its job (scheduler or exit status); never blocks."""
    _, variants, _ = _variants(config_path, overrides, seeds, sweep_dir)
    launcher, record, jobs = _recorded(sweep_dir, variants[0].config)
    for v in variants:
        v.world_size = record.get("world_size", 1)
    states = launcher.states(list(jobs.values())) if launcher else {}
    shared_failed = any(states[name].failed for name, one in jobs.items() if one.kind == "shared")
    for name in sorted(n for n, one in jobs.items() if one.kind == "shared"):
        log(f"{name} (stages the variants share): job: {states[name].text}")
    failed = []
    for v in variants:
        plans = _plans(v, names)
        if _done(plans, v.workdir):
            in_store = "done"
        else:
            in_store = ", ".join(f"{p.stage.name} {p.reason}" for p in plans if not p.fresh) or "not linked yet"
        state = states.get(v.name)
        job = state.text if state else ("not started (its shared-stages job failed)" if shared_failed
                                         else "not launched")
        log(f"{v.name}: {in_store}; job: {job}")
        # The store decides: a job that has ended without leaving its variant done failed, however it ended.
        if in_store != "done" and ((state and not state.active) or (not state and shared_failed)):
            failed.append(v.name)
    if failed:
        _print_failures(launcher, record, failed, log=log)
    return EXIT_FAILED if failed else EXIT_OK


def _print_failures(launcher: Launcher, record: dict, failed: list[str], *, log) -> None:
    """One paragraph per failed variant (and failed shared-stages job): its job, its logs and their last lines."""
    jobs = {name: Submitted.from_record(name, job) for name, job in record.get("jobs", {}).items()}
    states = launcher.states(list(jobs.values())) if jobs else {}
    broken_shared = [name for name, one in jobs.items() if one.kind == "shared" and states[name].failed]
    for name in broken_shared + failed:
        one = jobs.get(name)
        if one is None or not states[name].started and not states[name].active and not states[name].failed:
            log(f"\n{name} FAILED: not started, because the shared-stages job it needs failed (above).")
            continue
        last = launcher.logs(one)[-1]
        log(f"\n{name} FAILED: {launcher.describe(one, states[name])}. Last lines of {last.name}:\n"
            + _indent(tail(last)) + "\nRerun the same sweep to run only what is missing or failed.")


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
