"""Command line: `python -m pipeline run|status|sweep|gc|export|report`.

Exit 0 ok, 1 bug (traceback), 2 user error (one paragraph naming the file or key and the fix).
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
from pathlib import Path

from pipeline.core.errors import UserError, storage_error

EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2
ERROR_DIR_ENV = "RST_MART_ERROR_DIR"  # set by pipeline.torchrun: where ranks leave their user errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="MART adversarial training with an RST-style pseudo-labeled pool, as cached stages.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run stages that are stale (and their stale upstream stages)"),
                            ("status", "show each stage as fresh, stale or missing, with its fingerprint"),
                            ("sweep", "run a grid of variants (--set key=v1,v2), sharing stages through the store")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", help="TOML config (default: configs/demo.toml)")
        sub.add_argument("--stages", default=None,
                         help="comma-separated stages (default: teacher,pseudolabel,mart)")
        sub.add_argument("--workdir", help="where artifacts live (default: runs/<config name>, "
                                           "runs/<config name>-sweep for a sweep)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config key; repeatable" + (" (comma-separated values: one variant each)"
                                                                       if name == "sweep" else ""))
        if name == "run":
            sub.add_argument("--force", action="store_true", help="rerun the named stages even when cached")
        if name == "status":
            sub.add_argument("--verify", action="store_true",
                             help="also check every output's recorded checksum (reads the outputs)")
        if name == "sweep":
            _sweep_options(sub)
    gc = commands.add_parser("gc", help="list (--dry-run) or remove store entries that no work dir links to")
    gc.add_argument("--store", help="the store (default: as a run with --config/--workdir would use)")
    gc.add_argument("--config", help="TOML config whose run.store to use")
    gc.add_argument("--workdir", help="a work dir whose default store to use")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    export = commands.add_parser("export", help="write a model.pt in another format (RobustBench)")
    export.add_argument("model", help="a model.pt written by rst-mart, e.g. runs/demo/mart/model.pt")
    export.add_argument("--format", default="robustbench", choices=["robustbench"])
    export.add_argument("-o", "--output", required=True, help="the file to write")
    report = commands.add_parser("report", help="write <workdir>/report.html: stages, curves, pseudo-labels, results")
    report.add_argument("--config", help="TOML config (default: configs/demo.toml)")
    report.add_argument("--workdir", help="the work dir (default: runs/<config name>)")
    report.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def _sweep_options(sub) -> None:
    sub.add_argument("--seeds", default="", help="comma-separated run.seed values, e.g. 0,1,2")
    sub.add_argument("--launcher", choices=["serial", "local", "slurm"], default="serial",
                     help="serial: one variant after another in this process (default); local: --jobs processes "
                          "on this machine; slurm: a job array through submitit ([launcher] settings)")
    sub.add_argument("--jobs", type=int, default=1,
                     help="local: variants at once (one GPU each, or the CPU cores split between them)")
    sub.add_argument("--no-wait", dest="wait", action="store_false",
                     help="slurm: return once the jobs are submitted")
    sub.add_argument("--status", action="store_true",
                     help="show each variant's state in the store and its job's, without waiting")
    slurm = sub.add_argument_group("slurm (override the config's [launcher] section)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--time", dest="time_min", type=int, help="minutes per job before it is checkpointed and requeued")
    slurm.add_argument("--nodes", type=int, help="nodes per variant (multi-node training)")
    slurm.add_argument("--tasks-per-node", type=int, help="processes per node, one per GPU")
    slurm.add_argument("--gpus", dest="gpus_per_node", type=int, help="GPUs per node")
    slurm.add_argument("--cpus", dest="cpus_per_task", type=int, help="CPU cores per process")
    slurm.add_argument("--mem", dest="mem_gb", type=int, help="memory per node, GiB")
    slurm.add_argument("--sbatch", action="append", default=None, metavar="--OPTION[=VALUE]",
                       help="another sbatch option, e.g. --sbatch=--qos=high; repeatable")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
        _leave_for_launcher(str(e))
        print(_paragraph(f"error: {e}"), file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as e:
        # The last net for a full disk, quota, read-only filesystem, I/O error or permission problem
        # that no writer translated: the user's to fix, so a paragraph, not a traceback.
        error = storage_error(e, args.workdir or Path.cwd(), doing="using")
        if error is not None:
            print(_paragraph(f"error: {error}"), file=sys.stderr)
            return EXIT_USER
        traceback.print_exc()
        print("\nThis is a bug in rst-mart (not in your input); please report it with the traceback above.",
              file=sys.stderr)
        return EXIT_BUG


def _leave_for_launcher(message: str) -> None:
    """Under `python -m pipeline.torchrun`, leave this rank's user error where the launcher reads it."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir:
        Path(error_dir, f"rank-{int(os.environ.get('RANK', 0)):05d}.txt").write_text(message)


def _dispatch(args) -> int:
    from pipeline.config import load_config
    from pipeline.runner import default_workdir

    if args.command == "gc":
        return _gc(args)
    if args.command == "export":
        return _export(args)
    config = load_config(args.config, args.overrides if args.command != "sweep" else ())
    if args.command == "sweep":
        return _sweep(args, Path(args.workdir) if args.workdir else Path(f"{default_workdir(args.config)}-sweep"))
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.config)
    if args.command == "report":
        return _report(config, workdir)
    if args.command == "status":
        return _status(config, workdir, _stage_names(args), verify=args.verify)
    return _run(config, workdir, _stage_names(args), force=args.force)


def _sweep(args, workdir: Path) -> int:
    from pipeline import sweep
    from pipeline.launchers import sweep as launched

    if args.status:
        return launched.sweep_status(args.config, args.overrides, _stage_names(args), workdir, seeds=args.seeds)
    if args.launcher == "serial":
        if args.jobs != 1:
            raise UserError(f"--jobs {args.jobs} runs variants at once, which the serial launcher does not; "
                            f"add --launcher local (or drop --jobs).")
        sweep.run_sweep(args.config, args.overrides, _stage_names(args), workdir, seeds=args.seeds)
        return EXIT_OK
    flags = {key: getattr(args, key) for key in ("partition", "time_min", "nodes", "tasks_per_node",
                                                 "gpus_per_node", "cpus_per_task", "mem_gb", "sbatch")}
    return launched.launch_sweep(args.config, args.overrides, _stage_names(args), workdir, seeds=args.seeds,
                                 launcher=args.launcher, jobs=args.jobs, wait=args.wait, launcher_flags=flags)


def _stage_names(args) -> list[str]:
    from pipeline.runner import DEFAULT_STAGES

    return [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(DEFAULT_STAGES)


def _status(config, workdir: Path, names: list[str], *, verify: bool) -> int:
    from pipeline.runner import Runner, run_in_progress

    holder = run_in_progress(workdir)
    if holder:
        print(f"a run is in progress in {workdir} ({holder})")
    for plan in Runner(config, workdir).plan(names, verify=verify):
        state = "fresh" if plan.fresh else plan.reason
        print(f"{plan.stage.name}: {state}  fingerprint {plan.fingerprint[:16]}")
    return EXIT_OK


def _run(config, workdir: Path, names: list[str], *, force: bool) -> int:
    from pipeline.core import distributed
    from pipeline.runner import Runner

    info = distributed.dist_info()
    log = print if info.is_main else (lambda message: None)
    try:  # under torchrun, runner.run joins the process group (device type from run.device)
        plans = Runner(config, workdir, log=log).run(names, force=force)
    finally:
        distributed.destroy_process_group()
    if info.is_main:
        print_results(workdir, [p.stage.name for p in plans])
    return EXIT_OK


def print_results(workdir: Path, names: list[str]) -> None:
    """Every results.csv of the given stages as one table."""
    import pandas as pd

    frames = []
    for name in names:
        path = Path(workdir) / name / "results.csv"
        if path.exists():
            frame = pd.read_csv(path)
            frame.insert(0, "stage", name)
            frames.append(frame)
    frames = [f for f in frames if not f.empty]
    if frames:
        print(f"\nresults ({workdir}):")
        print(pd.concat(frames, ignore_index=True).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _gc(args) -> int:
    from pipeline.config import load_config
    from pipeline.runner import default_workdir, run_in_progress
    from pipeline.store import Store, entry_size, store_dir

    if args.store:
        root = Path(args.store)
    else:
        config = load_config(args.config)
        root = store_dir(config.run.store, Path(args.workdir) if args.workdir else default_workdir(args.config))
    if not root.is_dir():
        raise UserError(f"there is no stage store at {root}; name it with --store (or run.store / $RST_MART_STORE).")
    store = Store(root)
    busy = [w for w in _registered_workdirs(store) if run_in_progress(w)]
    if busy:
        raise UserError(f"a run is in progress in {busy[0]} ({run_in_progress(busy[0])}); run gc when it has "
                        f"finished, so it cannot remove an entry that run is about to use.")
    unreferenced = store.unreferenced()
    total = sum(entry_size(e) for e in unreferenced)
    verb = "would remove" if args.dry_run else "removing"
    for entry in unreferenced:
        print(f"{verb} {entry} ({entry_size(entry) / 2**20:.1f} MiB)")
        if not args.dry_run:
            import shutil

            shutil.rmtree(entry)
    print(f"{len(unreferenced)} unreferenced entries, {total / 2**20:.1f} MiB" +
          (" (dry run: nothing removed)" if args.dry_run else " removed"))
    return EXIT_OK


def _registered_workdirs(store) -> list[Path]:
    refs = store.root / "workdirs"
    return [Path(r.read_text().strip()) for r in sorted(refs.glob("*"))] if refs.exists() else []


def _export(args) -> int:
    from ml.checkpoints import export_checkpoint

    note = export_checkpoint(Path(args.model), Path(args.output), format=args.format)
    print(f"wrote {args.output}" + (f"\n{note}" if note else ""))
    return EXIT_OK


def _report(config, workdir: Path) -> int:
    from pipeline.report import write_report
    from pipeline.runner import DEFAULT_STAGES, Runner

    names = list(DEFAULT_STAGES) + (["eval"] if (workdir / "eval").exists() else [])
    rows = [{"name": p.stage.name, "state": "fresh" if p.fresh else p.reason, "fingerprint": p.fingerprint,
             "dir": p.entry} for p in Runner(config, workdir).plan(names)]
    print(f"wrote {write_report(workdir, rows)}")
    return EXIT_OK


def _paragraph(text: str) -> str:
    # Paths stay whole: a line break inside one would make it impossible to copy.
    return textwrap.fill(" ".join(text.split()), width=100, break_on_hyphens=False, break_long_words=False)
