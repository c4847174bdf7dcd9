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


_CONFIG_HELP = ("TOML config (default: the one `run` recorded in the work dir when no --set is given either, "
                "else configs/demo.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="MART adversarial training with an RST-style pseudo-labeled pool, as cached stages.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run stages that are stale (and their stale upstream stages)"),
                            ("status", "show each stage as fresh, stale or missing, with its fingerprint"),
                            ("sweep", "run a grid of variants (--set key=v1,v2), sharing stages through the store")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config",
                         help=_CONFIG_HELP if name == "status" else "TOML config (default: configs/demo.toml)")
        sub.add_argument("--stages", default=None,
                         help="comma-separated stages (default: those the stages mark as default)")
        sub.add_argument("--workdir", help="where artifacts live (default: runs/<config name>, "
                                           "runs/<config name>-sweep for a sweep)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config key; repeatable" + (" (comma-separated values: one variant each)"
                                                                       if name == "sweep" else ""))
        if name == "run":
            sub.add_argument("--force", action="store_true", help="rerun the named stages even when cached")
            _launcher_options(sub, jobs_help="jobs that make a sharded stage's shards (local: at once, one GPU "
                                             "each or the CPU cores split; slurm: one array)")
            sub.add_argument("--shard", type=_shard, metavar="I/N",
                             help="make only shard I of N of the one sharded stage --stages names, into its "
                                  "store entry's partial directory, and commit nothing (what each job of "
                                  "--launcher runs; a later plain `run` commits the stage)")
            sub.add_argument("--shard-of", help=argparse.SUPPRESS)  # the fingerprint the launching run planned
        if name == "status":
            sub.add_argument("--verify", action="store_true",
                             help="also check every output's recorded checksum (reads the outputs)")
        if name == "sweep":
            _sweep_options(sub)
    gc = commands.add_parser("gc", help="list (--dry-run) or remove store entries that no registered work dir "
                                        "links to and nothing used within --keep (a moved or deleted work dir "
                                        "keeps its entries until --forget)")
    gc.add_argument("--store", help="the store (default: as a run with --config/--workdir would use)")
    gc.add_argument("--config", help="TOML config whose run.store to use (default: the work dir's recorded one)")
    gc.add_argument("--workdir", help="a work dir whose store to use (a moved one is registered at its new place)")
    gc.add_argument("--dry-run", action="store_true",
                    help="only list what would be kept (and why) and removed, with sizes (takes no lock)")
    gc.add_argument("--keep", default="14d", metavar="DURATION",
                    help="keep unreferenced entries a run, status or report used within this long: 14d (the "
                         "default), 12h, 2w, ...; 0 keeps none for their age")
    gc.add_argument("--forget", action="append", default=[], metavar="PATH",
                    help="a registered work dir that no longer exists (or now links into another store, as after "
                         "cp -a of a whole project): stop keeping its entries (repeatable)")
    gc.add_argument("--wait", action="store_true",
                    help="wait until no run uses the store instead of exiting 2 (for a scheduled gc; runs that "
                         "start meanwhile are let in, so on a store that is never idle it keeps waiting)")
    export = commands.add_parser("export", help="write a model.pt in another format (RobustBench)")
    export.add_argument("model", help="a model.pt written by a stage, e.g. runs/<config name>/<stage>/model.pt")
    export.add_argument("--format", default="robustbench", help="robustbench (the only one so far; default)")
    export.add_argument("-o", "--output", required=True, help="the file to write")
    report = commands.add_parser("report", help="write <workdir>/report.html: stages, curves, pseudo-labels, results")
    report.add_argument("--config", help=_CONFIG_HELP)
    report.add_argument("--workdir", help="the work dir (default: runs/<config name>)")
    report.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def _sweep_options(sub) -> None:
    sub.add_argument("--seeds", default="", help="comma-separated run.seed values, e.g. 0,1,2")
    _launcher_options(sub, jobs_help="local: variants at once (one GPU each, or the CPU cores split between them)")
    sub.add_argument("--no-wait", dest="wait", action="store_false",
                     help="slurm: return once the jobs are submitted")
    sub.add_argument("--status", action="store_true",
                     help="show each variant's state in the store and its job's, without waiting")


_SLURM_FLAGS = ("partition", "time_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb",
                "sbatch")


def _launcher_options(sub, *, jobs_help: str) -> None:
    from pipeline.launchers import LAUNCHERS

    sub.add_argument("--launcher", choices=list(LAUNCHERS), default="serial",
                     help="serial: everything in this process, one thing after another (default); local: --jobs "
                          "processes on this machine; slurm: job arrays through submitit ([launcher] settings)")
    sub.add_argument("--jobs", type=int, default=1, help=jobs_help)
    slurm = sub.add_argument_group("slurm (override the config's [launcher] section)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--time", dest="time_min", type=int,
                       help="minutes per job before it is checkpointed and requeued")
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
        if not _leave_for_launcher(str(e)):  # under the launcher, it prints the paragraph once for all ranks
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


def _leave_for_launcher(message: str) -> bool:
    """Under `python -m pipeline.torchrun`, leave this rank's user error where the launcher reads it
    (True), so that it is printed once, not once per rank."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not error_dir:
        return False
    Path(error_dir, f"rank-{int(os.environ.get('RANK', 0)):05d}.txt").write_text(message)
    return True


def _dispatch(args) -> int:
    from pipeline.runner import default_workdir
    from pipeline.workdir_record import choose_config

    if args.command == "gc":
        return _gc(args)
    if args.command == "export":
        return _export(args)
    if args.command == "sweep":
        return _sweep(args, _usable_workdir(Path(args.workdir) if args.workdir
                                            else Path(f"{default_workdir(args.config)}-sweep")))
    workdir = _usable_workdir(Path(args.workdir) if args.workdir else default_workdir(args.config))
    config, note = choose_config(args.config, args.overrides, workdir, use_record=args.command != "run")
    if args.command == "report":
        return _report(config, workdir, note=note)
    if args.command == "status":
        return _status(config, workdir, _stage_names(args), verify=args.verify, note=note)
    if args.shard is not None:
        return _make_shards(config, workdir, _stage_names(args), args.shard, expected=args.shard_of)
    return _run(config, workdir, _stage_names(args), force=args.force, note=note,
                launcher=_run_launcher(args, config, workdir))


def _usable_workdir(workdir: Path) -> Path:
    """`workdir` when it is, or can become, a directory: refused up front when it, or a folder above it,
    is a file (mkdir would fail with a traceback after the config was read, or `status` would plan
    for a work dir that cannot exist)."""
    for path in (workdir, *workdir.parents):
        if path.exists() or path.is_symlink():
            if path.is_dir():
                return workdir
            what = "is" if path == workdir else f"is inside {path}, which is"
            raise UserError(f"the work dir {workdir} {what} a file (or a broken link), not a directory; give "
                            "--workdir a directory (an existing one, or a new path whose parent is a directory), "
                            "or move the file away.")
    return workdir


def _shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N (for example 0/4)")
    return int(index), int(count)


def _sweep(args, workdir: Path) -> int:
    from pipeline import sweep_grid, sweep_jobs
    from pipeline.config import LauncherConfig
    from pipeline.launchers import LAUNCHERS, make_launcher

    if args.status:
        return sweep_jobs.sweep_status(args.config, args.overrides, _stage_names(args), workdir, seeds=args.seeds)
    if LAUNCHERS[args.launcher].in_process:
        make_launcher(args.launcher, LauncherConfig(), folder=workdir, jobs=args.jobs).check()  # refuses --jobs N
        sweep_grid.run_sweep(args.config, args.overrides, _stage_names(args), workdir, seeds=args.seeds)
        return EXIT_OK
    return sweep_jobs.launch_sweep(args.config, args.overrides, _stage_names(args), workdir, seeds=args.seeds,
                                   launcher=args.launcher, jobs=args.jobs, wait=args.wait,
                                   launcher_flags={key: getattr(args, key) for key in _SLURM_FLAGS})


def _stage_names(args) -> list[str]:
    from pipeline import stage_registry

    if args.stages:
        return [s.strip() for s in args.stages.split(",") if s.strip()]
    return stage_registry.default_stages(stage_registry.stages())


def _status(config, workdir: Path, names: list[str], *, verify: bool, note: str = "") -> int:
    from pipeline.core.distributed import dist_info
    from pipeline.runner import Runner, run_in_progress

    if not dist_info().is_main:  # under torchrun (to plan at its world size) every rank plans alike: one prints
        return EXIT_OK
    if note:
        print(f"status: {note}")
    holder = run_in_progress(workdir)
    if holder:
        print(f"a run is in progress in {workdir} ({holder})")
    runner = Runner(config, workdir)
    if not holder:  # a copy (`cp -r`) gets its own record, so gc keeps what it links to (the run does it itself)
        runner.store.note_workdir(workdir)
    for plan in runner.plan(names, verify=verify):
        state = "fresh" if plan.fresh else plan.reason
        if not plan.fresh and plan.stage.shards is not None:  # a sharded stage resumes by shard: say how far it got
            partial = runner.store.partial(plan.stage.name, plan.fingerprint)
            outputs = plan.stage.output_names(config)
            made = sum((partial / name).is_file() for name in outputs) if partial.is_dir() else 0
            state += f" ({made} of {len(outputs)} shards made)" if made else ""
        print(f"{plan.stage.name}: {state}  fingerprint {plan.fingerprint[:16]}")
    return EXIT_OK


def _run_launcher(args, config, workdir: Path):
    """The launcher whose jobs make a sharded stage's shards, checked before anything runs."""
    from pipeline.core.distributed import dist_info
    from pipeline.launchers import make_launcher

    launcher = make_launcher(args.launcher, config.launcher, folder=workdir, jobs=args.jobs,
                             run_device=config.run.device, flags={key: getattr(args, key) for key in _SLURM_FLAGS})
    launcher.check()
    if launcher.in_process:
        return launcher
    if dist_info().enabled:
        raise UserError(f"--launcher {args.launcher} starts jobs of its own, but this run is under torchrun, whose "
                        f"ranks already make a sharded stage's shards between them; use one or the other.")
    if launcher.world_size != 1:
        raise UserError(f"a shard job is one process, but launcher.nodes x launcher.tasks_per_node is "
                        f"{launcher.world_size}; set both to 1 for `run --launcher {args.launcher}` and use --jobs "
                        f"for more processes.")
    return launcher


def _make_shards(config, workdir: Path, names: list[str], shard: tuple[int, int], *, expected: str | None) -> int:
    from pipeline.config_checks import check_device_here
    from pipeline.runner import Runner

    check_device_here(config)
    Runner(config, workdir).make_shards(names, shard, expected=expected)
    return EXIT_OK


def _run(config, workdir: Path, names: list[str], *, force: bool, note: str = "", launcher=None) -> int:
    from pipeline.config_checks import check_device_here
    from pipeline.core import distributed
    from pipeline.runner import Runner

    check_device_here(config)
    info = distributed.dist_info()
    log = print if info.is_main else (lambda message: None)
    if note:
        log(f"run: {note}")
    try:  # under torchrun, runner.run joins the process group (device type from run.device)
        plans = Runner(config, workdir, log=log, launcher=launcher).run(names, force=force)
    finally:
        distributed.destroy_process_group()
    if info.is_main:
        print_results(workdir, plans)
    return EXIT_OK


def print_results(workdir: Path, plans) -> None:
    """The rows every finished stage contributes (`Stage.results`), as one table."""
    import pandas as pd

    rows = [{"stage": p.stage.name, **row} for p in plans if p.stage.results is not None
            for row in p.stage.results(p.entry)]
    if rows:
        frame = pd.DataFrame(rows).drop(columns="axis", errors="ignore")
        print(f"\nresults ({workdir}):")
        print(frame.to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4f}"))


def _gc(args) -> int:
    """pipeline.store_gc says what goes. Removing holds the store's lock exclusively (runs hold it shared),
    so it never races a run; without --wait a busy store is exit 2, with it gc blocks until the store is
    free. --dry-run takes no lock and changes nothing. Nothing is written before space is freed: on a
    full disk gc still works, and its messages name the store's filesystem."""
    from pipeline.core import locks
    from pipeline.core.errors import storage_errors
    from pipeline.runner import default_workdir, run_in_progress
    from pipeline.store import Store, store_dir
    from pipeline.store_gc import gc, parse_keep
    from pipeline.workdir_record import choose_config
    from pipeline.workdir_registry import read_id

    parse_keep(args.keep)  # a typo fails before anything is looked at
    if args.store:
        root = Path(args.store)
    else:
        workdir = _usable_workdir(Path(args.workdir)) if args.workdir else default_workdir(args.config)
        config = choose_config(args.config, [], workdir)[0]
        root = store_dir(config.run.store, workdir)
    if not root.is_dir():
        raise UserError(f"there is no stage store at {root}; name it with --store (or run.store / $RST_MART_STORE).")
    store = Store(root)
    if args.dry_run:
        with storage_errors(root, doing="reading the store"):
            gc(store, forget_paths=args.forget, keep=args.keep, remove=False)
        return EXIT_OK
    def busy_workdirs() -> list[str]:
        return [f"{r.path} ({run_in_progress(r.path)})" for r in store.registry.all() if run_in_progress(r.path)]

    def waiting(holder: str) -> None:
        busy = busy_workdirs()
        print(f"waiting for the runs using the store {root} to finish" + (f": {', '.join(busy)}" if busy else ""),
              flush=True)

    try:
        with storage_errors(root, doing="collecting the store"), \
                locks.exclusive(store.lock_file, wait=args.wait, on_wait=waiting):
            moved = args.workdir and read_id(Path(args.workdir)) is not None
            recorded = _register_moved(store, Path(args.workdir)) if moved else True
            gc(store, forget_paths=args.forget, keep=args.keep, remove=True)
            if not recorded and _register_moved(store, Path(args.workdir), quiet=True):  # gc freed the space
                print(f"recorded {args.workdir} in the store's registry now that gc has freed space")
    except locks.Locked:
        busy = busy_workdirs()
        raise UserError(f"runs are using the store {root}" + (f": {', '.join(busy)}" if busy else "") +
                        "; gc removes entries only while no run holds the store, so that it never removes one "
                        "a run is about to use. Run gc when they have finished, or with --wait (`gc --dry-run` "
                        "works now).") from None
    return EXIT_OK


def _register_moved(store, workdir: Path, *, quiet: bool = False) -> bool:
    """A moved work dir's record follows it here (a copy gets its own). Writing it needs free bytes, which a
    full store may lack: then its entries stay kept as a moved work dir's, gc goes on, and tries again
    once it has freed space."""
    try:
        store.register(workdir)
    except (OSError, UserError) as e:
        if not quiet:
            print(f"could not record {workdir} in the store's registry yet ({e}); its entries stay kept as those "
                  f"of a registered work dir that moved.")
        return False
    return True


def _export(args) -> int:
    from pipeline import library

    note = library.function("export")(Path(args.model), Path(args.output), format=args.format)
    print(f"wrote {args.output}" + (f"\n{note}" if note else ""))
    return EXIT_OK


def _report(config, workdir: Path, *, note: str = "") -> int:
    from pipeline import stage_registry
    from pipeline.report import write_report
    from pipeline.runner import Runner, run_in_progress

    if note:
        print(f"report: {note}")
    runner = Runner(config, workdir)
    if not run_in_progress(workdir):  # a copy (`cp -r`) gets its own record, so gc keeps what it links to
        runner.store.note_workdir(workdir)
    # The default stages (shown as missing when they are), and any other stage this work dir holds.
    names = stage_registry.default_stages(runner.stages)
    names += [n for n in runner.stages if n not in names and (workdir / n).exists()]
    rows = [{"name": p.stage.name, "state": "fresh" if p.fresh else p.reason, "fingerprint": p.fingerprint,
             # a stale stage: what the work dir still holds, its fingerprint shown beside the current one
             "dir": p.entry if p.fresh else workdir / p.stage.name} for p in runner.plan(names)]
    print(f"wrote {write_report(workdir, rows, stages=runner.stages, config_note=note)}")
    return EXIT_OK


def _paragraph(text: str) -> str:
    # Paths stay whole: a line break inside one would make it impossible to copy.
    return textwrap.fill(" ".join(text.split()), width=100, break_on_hyphens=False, break_long_words=False)
