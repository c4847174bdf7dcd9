"""`sweep --launcher local|slurm`: the grid planned first, then every variant as a `pipeline run` job.

The stages two or more variants share are built by their own jobs before the variants start, so nothing
is built twice even with every variant running at once (the store's entry locks would also make a
second builder wait and then find the entry done). `launch.json` in the sweep dir records which job
runs each variant; `sweep --status` reads it, the scheduler and the store, and never blocks. The
store decides what is done: a job that exited 0 but left a stage stale is a failure, and a rerun
launches only the variants that are not done.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, Config, load_config
from pipeline.core.atomic import atomic_write_json
from pipeline.core.errors import UserError
from pipeline.launchers import Job
from pipeline.runner import Runner
from pipeline.stage_registry import stages as registered_stages
from pipeline.store import store_dir
from pipeline.sweep_grid import _row, expand_grid, variant_name, write_table

LAUNCH_RECORD = "launch.json"  # in the sweep dir: which job ran (or runs) each variant
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                 "PREEMPTED", "ENDED", "GONE"}
POLL_S = 2.0  # seconds between squeue calls while a sweep waits for its SLURM jobs


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
    """Run the variants as jobs (`local`: `jobs` processes here; `slurm`: job arrays); the exit status."""
    varied, variants, store = _variants(config_path, overrides, seeds, sweep_dir)
    settings = variants[0].config.launcher
    for key, value in (launcher_flags or {}).items():
        if value is not None:
            setattr(settings, key, value)
    if launcher == "slurm":
        from pipeline.launchers import slurm

        slurm.require_slurm()  # before anything is written: exit 2 with the install command
        for v in variants:
            v.world_size = settings.nodes * settings.tasks_per_node
    else:
        from pipeline.launchers import local

        devices = local.gpu_devices(variants[0].config.run.device)
        local.check_jobs(jobs, devices)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for v in variants:
        if _done(_plans(v, names), v.workdir):
            log(f"{v.name}: done (every stage fresh in the store)")
        else:
            todo.append(v)
    shared, per_variant = plan_jobs(todo, names, config_path, store)
    if launcher == "slurm":
        finished = _launch_slurm(sweep_dir, shared, per_variant, settings, wait=wait, log=log)
        if not wait:
            return EXIT_OK
    else:
        finished = _launch_local(sweep_dir, shared, per_variant, jobs=jobs, devices=devices, log=log)
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
        _print_failures(sweep_dir, failed, log=log)
        # A variant that never started takes its shared-stages job's status (a user error there: 2).
        shared_codes = {code for name, code in finished.items() if name.startswith("shared-") and code}
        codes = {finished.get(name, max(shared_codes, default=None)) for name in failed}
        return EXIT_USER if codes == {EXIT_USER} else EXIT_FAILED
    return EXIT_OK


EXIT_OK, EXIT_FAILED, EXIT_USER = 0, 1, 2


def _launch_local(sweep_dir: Path, shared: list[Job], per_variant: list[Job], *, jobs: int, devices,
                  log) -> dict[str, int]:
    from pipeline.launchers import local, stage_lines

    record = {"launcher": "local", "jobs": {}}
    stage_names = list(registered_stages())

    def on_start(job, path, pid) -> None:  # so that `sweep --status` sees the job while it runs
        with lock:
            record["jobs"][job.name] = {"kind": job.kind, "exit": None, "pid": pid, "log": str(path)}
            atomic_write_json(sweep_dir / LAUNCH_RECORD, record)

    def on_done(outcome) -> None:  # called from the pool's threads, one at a time per job
        with lock:
            record["jobs"][outcome.job.name] = {"kind": outcome.job.kind, "exit": outcome.code,
                                                "log": str(outcome.log), "seconds": round(outcome.seconds, 1)}
            atomic_write_json(sweep_dir / LAUNCH_RECORD, record)
            state = "ok" if outcome.code == 0 else f"FAILED (exit {outcome.code})"
            log(f"== {outcome.job.name}: {state} in {outcome.seconds:.1f}s, log {outcome.log}")
            for line in stage_lines(outcome.log.read_text(errors="replace"), stage_names):
                log(f"   {line}")

    import threading

    lock = threading.Lock()
    outcomes = local.run_phases([shared, per_variant], jobs=jobs, devices=devices, log_dir=sweep_dir / "logs",
                                log=log, on_start=on_start, on_done=on_done)
    return {o.job.name: o.code for o in outcomes}


def _launch_slurm(sweep_dir: Path, shared: list[Job], per_variant: list[Job], settings, *, wait: bool,
                  log) -> dict[str, int]:
    from pipeline.launchers import slurm

    folder = (sweep_dir / "slurm").resolve()
    record = _read_record(sweep_dir) if _read_record(sweep_dir).get("launcher") == "slurm" else {}
    record.update(launcher="slurm", folder=str(folder), world_size=settings.nodes * settings.tasks_per_node)
    known = record.setdefault("jobs", {})
    live = slurm.states([j["job_id"] for j in known.values()], folder) if known else {}
    queued = {name for name, j in known.items() if live.get(j["job_id"]) in slurm.ACTIVE}
    for name in sorted(queued):
        log(f"{name}: still {live[known[name]['job_id']]} as job {known[name]['job_id']}; not submitted again")
    executor = slurm.make_executor(folder, settings, name=f"rst-mart-{sweep_dir.name}")
    new_shared = [j for j in shared if j.name not in queued]
    ids = slurm.submit(executor, new_shared)
    after = sorted({slurm.array_id(i) for i in ids} |
                   {slurm.array_id(known[n]["job_id"]) for n in queued if known[n]["kind"] == "shared"})
    new_variants = [j for j in per_variant if j.name not in queued]
    ids += slurm.submit(executor, new_variants, after=":".join(after) or None)
    for job, job_id in zip(new_shared + new_variants, ids):
        known[job.name] = {"kind": job.kind, "job_id": job_id, "command": str(job)}
        log(f"{job.name}: submitted as job {job_id}" + (f" (after {':'.join(after)})" if job.kind == "variant"
                                                            and after else ""))
    atomic_write_json(sweep_dir / LAUNCH_RECORD, record)
    if not wait:
        log(f"submitted; `python -m pipeline sweep --status` (same options) shows progress; logs in {folder}")
        return {}
    watched = {j.name: known[j.name]["job_id"] for j in shared + per_variant}
    last: dict[str, str] = {}
    while True:
        now = slurm.states(list(watched.values()), folder)
        for name, job_id in watched.items():
            if now[job_id] != last.get(name):
                log(f"{name}: {now[job_id]} (job {job_id})")
                last[name] = now[job_id]
        if not any(state in slurm.ACTIVE for state in now.values()):
            break
        time.sleep(POLL_S)  # the scheduler has no push notification we could wait on
    from pipeline.launchers import stage_lines

    stage_names = list(registered_stages())
    for name, job_id in watched.items():
        out, _ = slurm.log_paths(folder, job_id)
        if out.exists():
            for line in stage_lines(out.read_text(errors="replace"), stage_names):
                log(f"   {name}: {line}")
    return {}


def _read_record(sweep_dir: Path) -> dict:
    path = sweep_dir / LAUNCH_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def sweep_status(config_path, overrides: list[str], names: list[str], sweep_dir: Path, *, seeds: str = "",
                 log=print) -> int:
    """Each variant's state from the store and from its job (scheduler or exit status); never blocks."""
    _, variants, _ = _variants(config_path, overrides, seeds, sweep_dir)
    record = _read_record(sweep_dir)
    for v in variants:
        v.world_size = record.get("world_size", 1)
    jobs = record.get("jobs", {})
    states = {}
    if record.get("launcher") == "slurm" and jobs:
        from pipeline.launchers import slurm

        live = slurm.states([j["job_id"] for j in jobs.values()], Path(record["folder"]))
        states = {name: f"{live[j['job_id']]} (job {j['job_id']})" for name, j in jobs.items()}
    elif jobs:
        states = {name: _local_state(j) for name, j in jobs.items()}
    shared_failed = any(state.split(" ")[0] in FAILED_STATES - {"ENDED"} for name, state in states.items()
                        if name.startswith("shared-"))
    for name in sorted(n for n, j in jobs.items() if j["kind"] == "shared"):
        log(f"{name} (stages the variants share): job: {states[name]}")
    failed = []
    for v in variants:
        plans = _plans(v, names)
        if _done(plans, v.workdir):
            in_store = "done"
        else:
            in_store = ", ".join(f"{p.stage.name} {p.reason}" for p in plans if not p.fresh) or "not linked yet"
        job = states.get(v.name, "not started (its shared-stages job failed)" if shared_failed else "not launched")
        log(f"{v.name}: {in_store}; job: {job}")
        if in_store != "done" and (job.split(" ")[0] in FAILED_STATES or job.startswith("not started")):
            failed.append(v.name)
    if failed:
        _print_failures(sweep_dir, failed, log=log)
    return EXIT_FAILED if failed else EXIT_OK


def _local_state(job: dict) -> str:
    if job["exit"] is None:
        try:
            os.kill(job["pid"], 0)
        except ProcessLookupError:  # the sweep that started it was killed: rerun it to resume
            return f"interrupted (log {job['log']})"
        return f"running (pid {job['pid']}, log {job['log']})"
    return "exit 0" if job["exit"] == 0 else f"FAILED (exit {job['exit']})"


def _print_failures(sweep_dir: Path, failed: list[str], *, log) -> None:
    """One paragraph per failed variant: its job, its log files and their last lines."""
    from pipeline.launchers import tail

    record = _read_record(sweep_dir)
    jobs = record.get("jobs", {})
    slurm_states = {}
    if record.get("launcher") == "slurm" and jobs:
        from pipeline.launchers import slurm

        slurm_states = slurm.states([j["job_id"] for j in jobs.values()], Path(record["folder"]))
    broken_shared = [n for n, j in jobs.items() if j["kind"] == "shared" and
                     (j.get("exit", 0) not in (0, None) or slurm_states.get(j.get("job_id")) in FAILED_STATES - {"ENDED"})]
    for name in broken_shared + failed:
        job = jobs.get(name)
        if job is None:
            log(f"\n{name} FAILED: not started, because the shared-stages job it needs failed (above).")
            continue
        if record.get("launcher") == "slurm":
            from pipeline.launchers import slurm

            out, err = slurm.log_paths(Path(record["folder"]), job["job_id"])
            state = slurm_states[job["job_id"]]
            log(f"\n{name} FAILED: job {job['job_id']} {state}; its logs are {out} and {err}. Last lines of "
                "the error log:\n" + _indent(tail(err)) + "\nRerun the same sweep to resubmit only what is "
                "missing or failed.")
        else:
            log(f"\n{name} FAILED: exit {job['exit']}; its log is {job['log']}. Last lines:\n" + _indent(tail(job['log']))
                + "\nRerun the same sweep to run only what is missing or failed.")


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
