"""Command line: `python -m pipeline run|status`. Exit 0 ok, 1 bug, 2 user error (one paragraph)."""
from __future__ import annotations

import argparse
import sys
import textwrap
import traceback
from pathlib import Path

from pipeline.errors import UserError, storage_error

EXIT_OK, EXIT_BUG, EXIT_USER = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="MART adversarial training with an RST-style pseudo-labeled pool, as cached stages.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run stages that are stale (and their stale upstream stages)"),
                            ("status", "show each stage as fresh, stale or missing, with its fingerprint")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", help="TOML config (default: configs/demo.toml)")
        sub.add_argument("--stages", default=None,
                         help="comma-separated stages (default: teacher,pseudolabel,mart)")
        sub.add_argument("--workdir", help="where artifacts live (default: runs/<config name>)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override a config key; repeatable")
        if name == "run":
            sub.add_argument("--force", action="store_true", help="rerun the named stages even when cached")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as e:
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


def _dispatch(args) -> int:
    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.runner import DEFAULT_STAGES, Runner, default_workdir, results_table

    config = load_config(args.config, args.overrides)
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.config)
    names = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else list(DEFAULT_STAGES)
    info = distributed.dist_info()
    log = print if info.is_main else (lambda message: None)
    runner = Runner(config, workdir, log=log)
    if args.command == "status":
        for plan in runner.plan(names):
            state = "fresh" if plan.fresh else ("missing" if plan.reason == "missing" else plan.reason)
            log(f"{plan.stage.name}: {state}  fingerprint {plan.fingerprint[:16]}")
        return EXIT_OK
    try:  # under torchrun, runner.run joins the process group (device type from run.device)
        plans = runner.run(names, force=args.force)
    finally:
        distributed.destroy_process_group()
    table = results_table(workdir, [p.stage.name for p in plans])
    if not table.empty:  # the per-class pseudo-label rows stay in the CSV; the summary shows totals
        table = table[~table["split"].str.contains("[", regex=False)]
    if info.is_main and not table.empty:
        print(f"\nresults ({workdir}):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return EXIT_OK


def _paragraph(text: str) -> str:
    # Paths stay whole: a line break inside one would make it impossible to copy.
    return textwrap.fill(" ".join(text.split()), width=100, break_on_hyphens=False, break_long_words=False)
