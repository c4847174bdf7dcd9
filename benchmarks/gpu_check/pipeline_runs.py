"""The pipeline itself on the device, through the CLI in subprocesses: pseudolabel (labels agree with the
teacher on the CPU), mart at each precision and memory format, and resume after a SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from benchmarks.gpu_check.common import PGD_STEPS, ROOT, Context, Skipped, last_line


def pipeline_args(ctx: Context, stages: str, *extra: str) -> list[str]:
    """`python -m pipeline run` on the synthetic set, small-cnn (tiny-cnn in a rehearsal)."""
    arch = "tiny-cnn" if ctx.quick else "small-cnn"
    sets = [f"run.device={ctx.device.type}", "data.dataset=benchmarks.gpu_check:synthetic_cifar",
            "data.num_labeled=500", "pool.limit=2000", f"teacher.arch={arch}", "teacher.epochs=1",
            "teacher.batch_size=128", f"mart.arch={arch}", "mart.epochs=1",
            f"mart.epoch_size={256 if ctx.quick else 1024}", f"mart.batch_size={64 if ctx.quick else 128}",
            "mart.epsilon=0.031", "mart.step_size=0.007",
            f"mart.steps={2 if ctx.quick else PGD_STEPS}", "mart.eval_n=200", "mart.val_size=0", *extra]
    args = ["run", "--config", str(ROOT / "configs" / "smoke.toml"), "--stages", stages]
    for s in sets:
        args += ["--set", s]
    return args


def run_pipeline(ctx: Context, workdir: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([sys.executable, "-m", "pipeline", *args, "--workdir", str(ctx.workdir / workdir)],
                              cwd=ROOT, capture_output=True, text=True, timeout=ctx.timeout(timeout),
                              env=pipeline_env(ctx))
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise AssertionError(f"python -m pipeline run --stages {args[args.index('--stages') + 1]} ran past "
                             f"{ctx.timeout(timeout):g} s: {last_line(stderr)}") from None
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {last_line(proc.stderr or proc.stdout)}")
    return proc


def pipeline_env(ctx: Context) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RST_MART_STORE": str(ctx.workdir / "store")}


def check_pseudolabel(ctx: Context) -> str:
    from data.pseudolabel_file import PseudoLabelReader
    from ml.checkpoints import load_model

    run_pipeline(ctx, "fp32", pipeline_args(ctx, "teacher,pseudolabel"), timeout=240)
    workdir = ctx.workdir / "fp32"
    reader = PseudoLabelReader(workdir / "pseudolabel" / "pseudolabels.h5")
    images, labels = reader.read(0, len(reader)), np.asarray(reader.labels)
    teacher = load_model(workdir / "teacher" / "model.pt")  # on the CPU
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
        on_cpu = torch.cat([teacher(part).argmax(1) for part in x.split(500)]).numpy()
    agreement = float((on_cpu == labels).mean())
    if agreement < 0.99:
        raise AssertionError(f"only {agreement:.3f} of the {ctx.device.type} pseudo-labels agree with the teacher "
                             "on CPU")
    return f"{len(labels)} pool images labeled on {ctx.device.type}; {agreement:.4f} agree with the teacher on CPU"


def mart_check(precision: str, *, channels_last: bool = False, compile: bool = False) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        if precision == "fp16" and ctx.rehearsal:
            raise Skipped("run.precision = fp16 needs CUDA")
        extra = [f"run.precision={precision}", f"run.channels_last={str(channels_last).lower()}",
                 f"run.compile={str(compile).lower()}"]
        # Own work dir per setting; the store is shared, so the upstream stages of a precision run once.
        # --force: channels_last and compile are not in the mart stage's fingerprint.
        name = f"mart-{precision}{'-cl' if channels_last else ''}{'-compile' if compile else ''}"
        proc = run_pipeline(ctx, name, pipeline_args(ctx, "mart", *extra) + ["--force"], timeout=300)
        expected = f"training precision {precision} on {ctx.device.type}"
        if expected not in proc.stdout:
            raise AssertionError(f"the log does not say {expected!r}")
        metrics = pd.read_csv(ctx.workdir / name / "mart" / "metrics.csv")
        row = metrics.iloc[-1]
        if not np.isfinite(row["loss"]):
            raise AssertionError(f"the MART loss is {row['loss']}")
        return f"loss {row['loss']:.3f}, train adv acc {row['train_adv_acc']:.3f}, {row['images_per_s']:.0f} img/s"
    return check


def check_resume(ctx: Context) -> str:
    # mart.epochs=3 gives the stage a fingerprint of its own; checkpoint_every_s=0 checkpoints every step.
    args = pipeline_args(ctx, "mart", "mart.epochs=3", "run.checkpoint_every_s=0")
    workdir = ctx.workdir / "resume"
    command = [sys.executable, "-m", "pipeline", *args, "--workdir", str(workdir)]
    # A mart check that failed leaves its partial directory (with a checkpoint) behind: wait for a new one.
    partials = lambda: set((ctx.workdir / "store" / "mart").glob("*.partial/train_state.pt"))  # noqa: E731
    left_over = partials()
    checkpoints = lambda: partials() - left_over  # noqa: E731
    workdir.mkdir(parents=True, exist_ok=True)
    stderr = workdir.parent / "resume-killed.stderr"  # a file, not a pipe: nobody reads it while it runs
    with open(stderr, "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=pipeline_env(ctx), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + ctx.timeout(200)
    try:
        while not checkpoints():  # wait for the checkpoint itself, not for a guessed duration
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {proc.returncode}) before its first checkpoint: "
                                     f"{last_line(stderr.read_text())}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no mart checkpoint appeared in {ctx.timeout(200):g} s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if (workdir / "mart").exists():
        raise AssertionError("the kill came too late: the stage had finished")
    rerun = run_pipeline(ctx, "resume", args, timeout=300)
    resumed = [line.strip() for line in rerun.stdout.splitlines() if "resumed from checkpoint" in line]
    if not resumed:
        raise AssertionError("the rerun did not resume from the checkpoint")
    if not (workdir / "mart" / "model.pt").exists():
        raise AssertionError("the resumed run wrote no model.pt")
    return f"killed after the first checkpoint; rerun {resumed[0]} and finished"
