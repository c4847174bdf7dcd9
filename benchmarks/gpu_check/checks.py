"""The table of checks and the run over them: each check in try/except (a failure is a FAIL row and the
next check runs), the CSV rewritten after every row, a watchdog past --limit-s."""
from __future__ import annotations

import argparse
import faulthandler
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from benchmarks.gpu_check.common import COLUMNS, NO_CUDA, Context, Skipped, first_line
from benchmarks.gpu_check.ddp import check_ddp_gloo, check_ddp_nccl, ddp_worker
from benchmarks.gpu_check.diffusion import unet_sample_check, unet_train_check
from benchmarks.gpu_check.loader import check_loader_cpu, check_loader_cuda
from benchmarks.gpu_check.pipeline_runs import check_pseudolabel, check_resume, mart_check
from benchmarks.gpu_check.step import check_compile_cpu, check_fp16_scaler_cpu
from benchmarks.gpu_check.throughput import check_flops, wrn_check

# name -> (runs without CUDA, budget in seconds on an H100 (the run's limit skips what would overrun), check)
CHECKS: dict[str, tuple[bool, float, Callable[[Context], str]]] = {
    "loader-cpu": (True, 20, check_loader_cpu),
    "fp16-scaler-cpu": (True, 20, check_fp16_scaler_cpu),
    "ddp-gloo": (True, 40, check_ddp_gloo),
    "compile-cpu": (True, 60, check_compile_cpu),
    "flops": (True, 10, check_flops),
    "loader-cuda": (False, 20, check_loader_cuda),
    "pseudolabel": (False, 40, check_pseudolabel),
    "mart-fp32": (False, 30, mart_check("fp32")),
    "mart-bf16": (False, 40, mart_check("bf16")),
    "mart-fp16": (False, 40, mart_check("fp16")),
    "mart-bf16-cl": (False, 30, mart_check("bf16", channels_last=True)),
    "mart-compile": (False, 90, mart_check("bf16", channels_last=True, compile=True)),
    "resume": (False, 40, check_resume),
    "ddp-nccl": (False, 30, check_ddp_nccl),
    "wrn-fp32": (False, 40, wrn_check("fp32")),
    "wrn-bf16-cl": (False, 30, wrn_check("bf16", channels_last=True)),
    "wrn-compile": (False, 120, wrn_check("bf16", channels_last=True, compile=True)),
    "unet-train-bf16": (False, 40, unet_train_check("bf16", channels_last=True)),
    "unet-sample-bf16": (False, 30, unet_sample_check("bf16")),
    "unet-sample-fp32": (False, 30, unet_sample_check("fp32")),
}


def run_checks(names: list[str], ctx: Context, out: Path, limit_s: float, cuda: bool) -> pd.DataFrame:
    rows: list[dict] = []
    started = time.perf_counter()
    for name in names:
        runs_on_cpu, budget, check = CHECKS[name]
        began = time.perf_counter()
        if not runs_on_cpu and not cuda and not ctx.rehearsal:
            status, detail = "skipped", NO_CUDA
        elif not ctx.rehearsal and began - started + budget > limit_s:
            status, detail = "skipped", f"not started: its {budget:g} s budget would end past --limit-s {limit_s:g}"
        else:
            print(f"{name} ...", flush=True)
            try:
                status, detail = "ok", check(ctx)
            except Skipped as e:
                status, detail = "skipped", str(e)
            except Exception as e:  # one failing check (a compiler error, out of memory) must not hide the others
                status, detail = "FAIL", first_line(e)
                traceback.print_exc()
            if cuda:
                torch.cuda.empty_cache()
        seconds = time.perf_counter() - began
        if status == "ok" and cuda and not ctx.rehearsal and seconds > budget:
            detail += f" (over its {budget:g} s budget)"
        rows.append({"check": name, "status": status, "detail": detail, "seconds": round(seconds, 1)})
        write_table(rows, out)
    return pd.DataFrame(rows, columns=COLUMNS)


def write_table(rows: list[dict], out: Path) -> None:
    from pipeline.core.atomic import atomic_write_csv

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out, pd.DataFrame(rows, columns=COLUMNS))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from benchmarks import gpu_check

    parser = argparse.ArgumentParser(description=gpu_check.__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the tests)")
    parser.add_argument("--out", default="runs/gpu_check/gpu_check.csv", help="the table as CSV")
    parser.add_argument("--only", default="", help=f"comma-separated checks among: {', '.join(CHECKS)}")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: rehearse the CUDA checks on the CPU (numbers meaningless)")
    parser.add_argument("--limit-s", type=float, default=465.0,
                        help="seconds for the whole run; a check whose budget would end past it is skipped")
    parser.add_argument("--workdir", default="", help="keep the pipeline work dirs here (default: a temp dir, removed)")
    parser.add_argument("--ddp-worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_worker:
        print(ddp_worker(args.ddp_worker))
        return pd.DataFrame(columns=COLUMNS)
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose among {', '.join(CHECKS)}")
    cuda = torch.cuda.is_available()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Context(device=torch.device(args.device), quick=args.quick or args.device == "cpu", workdir=workdir)
    if not ctx.rehearsal:  # the limit is sized for a GPU; a rehearsal on a CPU takes what it takes
        # A last resort against a hung CUDA call: dump every thread's stack and exit; the CSV has the rows so far.
        faulthandler.dump_traceback_later(args.limit_s + 15, exit=True, file=sys.__stderr__)
    out = Path(args.out)
    device = torch.cuda.get_device_name() if cuda else "none"
    print(f"gpu_check: torch {torch.__version__}, CUDA device: {device}; rehearsal on cpu: {ctx.rehearsal}", flush=True)
    try:
        table = run_checks(names, ctx, out, args.limit_s, cuda)
    finally:
        faulthandler.cancel_dump_traceback_later()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    with pd.option_context("display.max_colwidth", 200, "display.width", 250):
        print(table.to_string(index=False))
    print(f"wrote {out.resolve()}")
    return table
