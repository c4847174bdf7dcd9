"""`python -m pipeline sweep`: a grid of variants of one config, every shared stage built once.

`--set mart.beta=1,3,6 --set mart.unsup_fraction=0,0.5 --seeds 0,1` is 3 x 2 x 2 variants. Each variant is
an ordinary run in its own work dir under the sweep's directory; all of them use one stage store, so
stages whose fingerprints agree (the teacher across beta values, say) are built once. An interrupted
sweep resumes by running the same command: finished variants are cached, a killed one resumes from its
checkpoint. A list-valued key takes TOML lists as its values: `--set 'mart.milestones=[5,8],[6,9]'`.

Serially (the default) the variants run one after another in this process. With `--launcher local` or
`slurm` (pipeline.launchers) each variant is a `python -m pipeline run` job; the grid is planned first,
and the stages two or more variants share are built by their own jobs before the variants start, so
nothing is built twice even with every variant running at once (the store's entry locks would also
make a second builder wait and then find the entry done).
"""
from __future__ import annotations

import itertools
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.atomic import atomic_path, atomic_write_csv, atomic_write_json
from pipeline.config import DEFAULT_CONFIG, Config, load_config, parse_override
from pipeline.core.errors import UserError
from pipeline.launchers import Job
from pipeline.runner import Runner, load_stages
from pipeline.store import store_dir

SEED_KEY = "run.seed"


def split_values(text: str) -> list[str]:
    """Top-level comma-separated values ("[5,8],[6,9]" -> ["[5,8]", "[6,9]"])."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def expand_grid(overrides: list[str], seeds: str) -> tuple[list[str], list[list[str]]]:
    """(the keys that vary, one override list per variant)."""
    axes: list[tuple[str, list[str]]] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} is not of the form section.key=value[,value...] "
                            f"(for example --set mart.beta=1,3,6).")
        values = split_values(text)
        if not all(values):
            raise UserError(f"--set {item!r} has an empty value; give values separated by commas, "
                            f"e.g. --set {key.strip()}=1,3,6.")
        axes.append((key.strip(), values))
    if seeds:
        values = split_values(seeds)
        if not all(v.isdigit() for v in values):
            raise UserError(f"--seeds {seeds!r} must be comma-separated non-negative integers, e.g. --seeds 0,1,2.")
        axes.append((SEED_KEY, values))
    varied = [key for key, values in axes if len(values) > 1]
    grid = [[f"{key}={value}" for (key, _), value in zip(axes, combo)]
            for combo in itertools.product(*(values for _, values in axes))]
    return varied, grid


def variant_name(variant: list[str], varied: list[str]) -> str:
    parts = [item for item in variant if item.partition("=")[0] in varied] or ["base"]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def run_sweep(config_path, overrides: list[str], names: list[str], sweep_dir: Path, *, seeds: str = "",
              log=print) -> Path:
    """Run every variant, then write sweep.csv and sweep.png in `sweep_dir`; returns sweep.csv's path."""
    varied, grid = expand_grid(overrides, seeds)
    # Every variant's config is checked before the first one runs: a typo fails in a second.
    configs = [load_config(config_path, variant) for variant in grid]
    store = store_dir(configs[0].run.store, sweep_dir)
    rows = []
    for variant, config in zip(grid, configs):
        config.run.store = str(store)
        name = variant_name(variant, varied)
        log(f"== variant {name}")
        plans = Runner(config, sweep_dir / name, log=log).run(names)
        rows.append(_row(variant, varied, name, plans))
        write_table(sweep_dir, rows, varied)
    log(f"sweep: {len(rows)} variants in {sweep_dir / 'sweep.csv'} and sweep.png")
    return sweep_dir / "sweep.csv"


def _row(variant: list[str], varied: list[str], name: str, plans) -> dict:
    import pandas as pd

    row = {"variant": name}
    for item in variant:
        key, _, text = item.partition("=")
        if key in varied or key == SEED_KEY:
            row[key] = parse_override(item)[2]
    seconds = 0.0
    for plan in plans:
        record = json.loads((plan.entry / "stage.json").read_text())
        seconds += record["seconds"]
        row[f"{plan.stage.name}_fingerprint"] = plan.fingerprint[:16]
    row["seconds"] = round(seconds, 1)
    mart = next((p for p in plans if p.stage.name == "mart"), None)
    if mart is not None:
        results = pd.read_csv(mart.entry / "results.csv")
        for attack, column in (("clean", "clean_acc"), ("pgd20", "pgd20_acc")):
            hit = results[(results["model"] == "mart") & (results["attack"] == attack)]
            row[column] = float(hit["accuracy"].iloc[0]) if len(hit) else float("nan")
    return row


def write_table(sweep_dir: Path, rows: list[dict], varied: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    atomic_write_csv(sweep_dir / "sweep.csv", frame)
    if {"clean_acc", "pgd20_acc"} <= set(frame.columns):
        plot(frame, [k for k in varied if k != SEED_KEY], sweep_dir / "sweep.png")


def plot(frame, keys: list[str], path: Path) -> None:
    """Clean vs PGD-20 accuracy, one point per variant (seeds averaged, their spread as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = frame.groupby(keys, sort=False) if keys else [((), frame)]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, group in groups:
        label = label if isinstance(label, tuple) else (label,)
        text = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, label)) or "base"
        ax.errorbar(100 * group["clean_acc"].mean(), 100 * group["pgd20_acc"].mean(),
                    xerr=100 * group["clean_acc"].std(ddof=0), yerr=100 * group["pgd20_acc"].std(ddof=0),
                    fmt="o", capsize=3, label=text)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("PGD-20 accuracy (%)")
    ax.set_title("sweep: one point per variant (mean over seeds, error bars = std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# -- launched sweeps: jobs on this machine or on SLURM -------------------------------------------------
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
    return Runner(variant.config, variant.workdir, log=lambda message: None).plan(names)


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
    stage_names = list(load_stages())

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
                                log=log, on_done=on_done)
    return {o.job.name: o.code for o in outcomes}


def _launch_slurm(sweep_dir: Path, shared: list[Job], per_variant: list[Job], settings, *, wait: bool,
                  log) -> dict[str, int]:
    from pipeline.launchers import slurm

    folder = (sweep_dir / "slurm").resolve()
    record = _read_record(sweep_dir) if _read_record(sweep_dir).get("launcher") == "slurm" else {}
    record.update(launcher="slurm", folder=str(folder))
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

    stage_names = list(load_stages())
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
    jobs = record.get("jobs", {})
    states = {}
    if record.get("launcher") == "slurm" and jobs:
        from pipeline.launchers import slurm

        live = slurm.states([j["job_id"] for j in jobs.values()], Path(record["folder"]))
        states = {name: f"{live[j['job_id']]} (job {j['job_id']})" for name, j in jobs.items()}
    elif jobs:
        states = {name: "exit 0" if j["exit"] == 0 else f"FAILED (exit {j['exit']})" for name, j in jobs.items()}
    shared_failed = any(state.split(" ")[0] in FAILED_STATES - {"ENDED"} for name, state in states.items()
                        if name.startswith("shared-"))
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
                     (j.get("exit", 0) != 0 or slurm_states.get(j.get("job_id")) in FAILED_STATES - {"ENDED"})]
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
                f"the error log:\n" + _indent(tail(err)) + "\nRerun the same sweep to resubmit only what is "
                f"missing or failed.")
        else:
            log(f"\n{name} FAILED: exit {job['exit']}; its log is {job['log']}. Last lines:\n" + _indent(tail(job['log']))
                + "\nRerun the same sweep to run only what is missing or failed.")


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
