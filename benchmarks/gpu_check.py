"""GPU readiness in one command: does the pipeline's CUDA path work, and how fast is WRN-28-10 MART?

    python -m benchmarks.gpu_check [--quick] [--out PATH] [--only a,b] [--device cuda|cpu] [--limit-s 465]

Prints one table (check, status ok/FAIL/skipped, detail, seconds) and writes it as CSV to the path it
prints (rewritten after every check, so a run that is killed keeps the rows it finished). Every check
runs in try/except: a failure records FAIL with the exception's first line and the next check runs.

CPU-side checks (always run, also in CI):
  loader-cpu       the MixedBatchLoader on a CPU device: no pinning, no copy stream, the same batches
                   with and without the prefetch thread
  fp16-scaler-cpu  one MART step in fp16 autocast through torch.amp.GradScaler("cpu") (the scaler path of
                   ml.training.train_one_epoch)
  ddp-gloo         DDP with gloo at world size 1: the DDP-wrapped MART steps give the plain model's
                   weights
  compile-cpu      torch.compile of the model and of the attack's forwards (ml.devices.attack_forward),
                   one MART step of tiny-cnn, equal to eager within 1e-4 (about a minute of inductor on 2
                   cores; skipped where CUDA is present: mart-compile covers it)
  flops            WRN-28-10 FLOPs per image of a MART step (PGD-10), counted on the meta device
CUDA checks (skipped with "no CUDA device" without one), on synthetic CIFAR-shaped data (32x32x3):
  loader-cuda      pinned host batches, non_blocking copies on the loader's copy stream: the batches equal
                   the CPU loader's while the compute stream is kept busy
  pseudolabel      `python -m pipeline run --stages teacher,pseudolabel` on CUDA; its labels agree with
                   the teacher run on the CPU
  mart-fp32, mart-bf16, mart-fp16, mart-bf16-cl, mart-compile
                   the mart stage through the CLI in fp32, bf16, fp16 (GradScaler), bf16+channels_last,
                   bf16+channels_last+run.compile (the model and the attack's forwards)
  resume           SIGKILL of the mart stage after its first checkpoint, rerun: it resumes and finishes
  ddp-nccl         DDP with NCCL at world size 1, as ddp-gloo, in a subprocess (a hung NCCL cannot hang the run)
  wrn-fp32, wrn-bf16-cl, wrn-compile
                   WRN-28-10 MART (PGD-10) images/s through the stage's step (benchmarks.bench_mart.StageLoop:
                   the real loader, attack, loss, SGD) at batch 256, 20 timed steps after 3 warm-up steps;
                   model FLOP utilisation = images/s x FLOPs per image (the flops row) / the card's peak

Peaks (dense, no sparsity) come from PEAK_TFLOPS by torch.cuda.get_device_name(): bf16 runs against the
bf16 peak, fp32 runs against the TF32 peak (cuDNN convolutions run in TF32 by PyTorch's default). H100 SXM:
989 / 495 TFLOP/s; H200 is the same chip at the same clocks. An unknown card gets no MFU.

--device cpu runs the CUDA checks on the CPU at --quick sizes (a rehearsal of this script; the numbers
mean nothing; no time limit). --quick shrinks every size (the tests use it). Runtime: the CPU-side checks about 1 minute on 2
cores; the whole default run is sized for under 8 minutes on one H100 (--limit-s: a check whose budget
would end past it is skipped; 15 s past the limit a watchdog dumps every thread's stack and exits, the CSV
holding the rows finished). Last seen: not yet run on a GPU (no GPU was lent to the session that wrote it).
"""
from __future__ import annotations

import argparse
import copy
import faulthandler
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["check", "status", "detail", "seconds"]
NO_CUDA = "no CUDA device"

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s, dense TF32 TFLOP/s); first match wins.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("GH200", 989.0, 495.0),
    ("H200", 989.0, 495.0),
    ("H100", 989.0, 495.0),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
]
PGD_STEPS = 10  # the MART training attack on CIFAR-10


class Skipped(Exception):
    """A check that cannot run here; its message is the reason in the table."""


@dataclass
class Context:
    device: torch.device  # where the CUDA checks run (cuda, or cpu for a rehearsal)
    quick: bool
    workdir: Path  # pipeline work dirs, the shared stage store, configs

    @property
    def rehearsal(self) -> bool:
        return self.device.type != "cuda"

    def timeout(self, seconds: float) -> float:
        """A subprocess's time limit: sized for a GPU, ten times that for a rehearsal on a CPU."""
        return seconds * (10 if self.rehearsal else 1)


def peak_tflops(device_name: str, precision: str) -> float | None:
    for fragment, bf16, tf32 in PEAK_TFLOPS:
        if fragment in device_name:
            return bf16 if precision in ("bf16", "fp16") else tf32
    return None


# -- synthetic data ---------------------------------------------------------------------------------------
def synthetic_cifar(root: str = "") -> dict:
    """A CIFAR-shaped labeled set (`data.dataset = "benchmarks.gpu_check:synthetic_cifar"`): each class a
    colour plus noise, so a teacher learns something in one epoch. 2,500 train and 500 test images."""
    rng = np.random.default_rng(0)
    colours = rng.uniform(0, 255, size=(10, 3))

    def images(n: int):
        labels = rng.integers(0, 10, n)
        x = 0.6 * colours[labels][:, None, None, :] + rng.uniform(0, 0.4 * 255, size=(n, 32, 32, 3))
        return x.astype(np.uint8), labels.astype(np.int64)

    train_images, train_labels = images(2500)
    test_images, test_labels = images(500)
    return dict(train_images=train_images, train_labels=train_labels, test_images=test_images,
                test_labels=test_labels, class_names=[f"class{i}" for i in range(10)])


def tiny_training(device, *, precision="fp32", compile=False, distributed=False, batches=2, batch_size=16,
                  seed=0):
    """A Training of tiny-cnn on synthetic 32x32x3 data, built as ml.training.set_up builds one (PGD-2)."""
    from benchmarks.bench_mart import synthetic_training_data
    from data.mixed import MixedBatchLoader, MixedBatchSampler
    from ml import training
    from ml.attacks import training_attack
    from ml.devices import attack_forward, prepare_for_training
    from ml.losses import LOSSES
    from ml.models import build_model
    from ml.optim import make_optimizer, make_scheduler
    from pipeline.config import RunConfig

    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model("tiny-cnn", num_classes=10, in_channels=3)
    run_cfg = RunConfig(device=str(device), precision=precision, compile=compile)
    train_model, scaler = prepare_for_training(model, run_cfg=run_cfg, device=device, distributed=distributed)
    if precision == "fp16" and scaler is None:
        raise AssertionError("prepare_for_training gave no GradScaler for fp16")
    data = synthetic_training_data((32, 32, 3), 64, 64, seed=seed)
    sampler = MixedBatchSampler(64, 64, batch_size=batch_size, unsup_fraction=0.5, epoch_size=batch_size * batches,
                                seed=seed)
    loader = MixedBatchLoader(sampler, data["images"], data["labels"], data["pool_images"], data["pool_labels"],
                              device=device, seed=seed, prefetch=0)
    optimizer = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = make_scheduler(optimizer, schedule="constant", epochs=1, steps_per_epoch=len(sampler))
    recipe = training.Recipe(arch="tiny-cnn", epochs=1, batch_size=batch_size, epoch_size=batch_size * batches,
                             lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="constant", loss=LOSSES["mart"],
                             attack=training_attack("mart", eps=8 / 255, step_size=2 / 255, steps=2),
                             unsup_fraction=0.5)
    t = training.Training(model=train_model, optimizer=optimizer, scheduler=scheduler, loader=loader, recipe=recipe,
                          device=device, precision=precision, seed=seed, scaler=scaler,
                          attack_model=attack_forward(model, compile))
    return t, model


def train_tiny(t) -> dict:
    from ml import training

    t.loader.sampler.set_epoch(0)
    stats = training.train_one_epoch(t, 0, progress_bar=False)
    if not np.isfinite(stats["loss"]):
        raise AssertionError(f"the MART loss is {stats['loss']}")
    return stats


def max_weight_difference(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double().cpu() - sb[k].double().cpu()).abs().max()) for k in sa)


# -- CPU-side checks --------------------------------------------------------------------------------------
def check_loader_cpu(ctx: Context) -> str:
    from benchmarks.bench_mart import synthetic_training_data
    from data.mixed import MixedBatchLoader, MixedBatchSampler

    data = synthetic_training_data((32, 32, 3), 128, 128)
    epochs = {}
    for prefetch in (0, 2):
        sampler = MixedBatchSampler(128, 128, batch_size=32, unsup_fraction=0.5, epoch_size=256, seed=0)
        loader = MixedBatchLoader(sampler, data["images"], data["labels"], data["pool_images"], data["pool_labels"],
                                  device="cpu", prefetch=prefetch)
        if loader._copy_stream is not None:
            raise AssertionError("a CPU loader made a CUDA copy stream")
        epochs[prefetch] = list(loader)
        if any(x.is_pinned() for x, _ in epochs[prefetch]):
            raise AssertionError("a CPU loader pinned its batches")
    same = all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(epochs[0], epochs[2]))
    if not same or len(epochs[0]) != len(epochs[2]) != 8:
        raise AssertionError("prefetch 0 and 2 gave different batches")
    return f"{len(epochs[0])} batches, unpinned, no copy stream, prefetch 0 == prefetch 2"


def check_fp16_scaler_cpu(ctx: Context) -> str:
    # prepare_for_training refuses fp16 on a CPU (a user error); this drives the loop's scaler path directly.
    t, model = tiny_training("cpu", batches=1, batch_size=8)  # fp16 convolutions are emulated on CPUs: slow
    t.precision, t.scaler = "fp16", torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = copy.deepcopy(model.state_dict())
    stats = train_tiny(t)
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    if not changed:
        raise AssertionError("the scaler skipped every step (no weight changed)")
    return f"loss {stats['loss']:.3f}, scale {t.scaler.get_scale():g} after {len(t.loader)} step(s), weights updated"


def check_ddp_gloo(ctx: Context) -> str:
    return ddp_worker("cpu")  # in this process: gloo at world size 1 does not hang, and saves a torch import


def check_compile_cpu(ctx: Context) -> str:
    if torch.cuda.is_available() and not ctx.rehearsal:
        raise Skipped("CUDA present: mart-compile runs the same code on the GPU")
    eager, eager_model = tiny_training("cpu", batches=1)
    compiled, compiled_model = tiny_training("cpu", batches=1, compile=True)
    train_tiny(eager)
    started = time.perf_counter()
    train_tiny(compiled)
    difference = max_weight_difference(eager_model, compiled_model)
    if not difference < 1e-4:
        raise AssertionError(f"compiled and eager weights differ by {difference:.2e} after one step")
    return (f"tiny-cnn, model + attack compiled (inductor) in {time.perf_counter() - started:.0f} s; "
            f"weights within {difference:.1e} of eager")


def mart_flops_per_image(arch: str = "wrn-28-10", steps: int = PGD_STEPS) -> dict:
    """FLOPs per image of one MART step of `arch` at 32x32x3, counted on the meta device (no compute):
    PGD-`steps` (each a forward and the input's gradient, eval mode), the loss's forwards on x and x',
    and the backward to the weights. Matrix products and convolutions only, as FlopCounterMode counts."""
    from torch.utils.flop_counter import FlopCounterMode

    from ml.models import build_model

    with torch.device("meta"):  # shapes only: no weights allocated or initialised
        model = build_model(arch, num_classes=10, in_channels=3)
    x = torch.empty(2, 3, 32, 32, device="meta")
    y = torch.zeros(2, dtype=torch.long, device="meta")
    # The attack's gradient is the input's only (weights frozen here: FlopCounterMode cannot follow
    # autograd.grad, so backward() stands in for it).
    model.eval().requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x.clone().requires_grad_(True)), y).backward()
    attack_step = counter.get_total_flops() / len(x)
    model.train().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        (model(x).sum() + model(x).sum()).backward()
    loss = counter.get_total_flops() / len(x)
    return {"attack_step": attack_step, "loss": loss, "total": steps * attack_step + loss}


def check_flops(ctx: Context) -> str:
    f = mart_flops_per_image()
    return (f"WRN-28-10 MART step: {f['total'] / 1e9:.1f} GFLOP per image = PGD-{PGD_STEPS} "
            f"{PGD_STEPS} x {f['attack_step'] / 1e9:.1f} + loss forwards and backward {f['loss'] / 1e9:.1f}")


# -- DDP at world size 1, in a subprocess (a hung NCCL must not hang the whole check) ----------------------
def run_ddp_worker(device: torch.device, timeout: float) -> str:
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--ddp-worker", device.type], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the DDP worker ran past {timeout:g} s") from None
    if proc.returncode != 0:
        raise AssertionError(f"worker exit {proc.returncode}: {last_line(proc.stderr or proc.stdout)}")
    return proc.stdout.strip().splitlines()[-1]


def ddp_worker(device_type: str) -> str:
    """One rank: init the process group as pipeline.core.distributed does (NCCL on CUDA, gloo on CPU), then
    MART steps on the DDP-wrapped model equal the plain model's."""
    import torch.distributed as dist

    cuda = device_type == "cuda"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            **({"device_id": device} if cuda else {}))
    try:
        wrapped, ddp_model = tiny_training(device, distributed=True)
        if not isinstance(wrapped.model, torch.nn.parallel.DistributedDataParallel):
            raise AssertionError(f"prepare_for_training gave {type(wrapped.model).__name__}, not DDP")
        plain, plain_model = tiny_training(device)
        train_tiny(wrapped)
        train_tiny(plain)
        difference = max_weight_difference(ddp_model, plain_model)
        if not difference < 1e-4:  # DDP at world size 1 changes no arithmetic; 1e-4 leaves room for GPU atomics
            raise AssertionError(f"DDP and plain weights differ by {difference:.2e}")
        return f"{dist.get_backend()} at world size 1: DDP weights within {difference:.1e} of the plain model's"
    finally:
        dist.destroy_process_group()


# -- CUDA checks --------------------------------------------------------------------------------------------
def check_loader_cuda(ctx: Context) -> str:
    from benchmarks.bench_mart import synthetic_training_data
    from data.mixed import MixedBatchLoader, MixedBatchSampler

    if ctx.rehearsal:
        raise Skipped("pinned memory and copy streams need CUDA")
    data = synthetic_training_data((32, 32, 3), 512, 512)

    def epoch(device, prefetch, busy):
        sampler = MixedBatchSampler(512, 512, batch_size=128, unsup_fraction=0.5, epoch_size=2048, seed=0)
        loader = MixedBatchLoader(sampler, data["images"], data["labels"], data["pool_images"], data["pool_labels"],
                                  device=device, prefetch=prefetch, channels_last=True)
        out = []
        for x, y in loader:
            if busy:  # keep the compute stream busy, so a missing wait on the copy would read stale memory
                a = torch.randn(2048, 2048, device=device)
                for _ in range(20):
                    a = a @ a / 2048 ** 0.5
            out.append((x.sum(dim=(1, 2, 3)).cpu(), y.cpu()))  # a kernel on the compute stream reads the batch
        return loader, out

    _, expected = epoch("cpu", 0, False)
    loader, _ = epoch(ctx.device, 2, False)
    if loader._copy_stream is None:
        raise AssertionError("a CUDA loader has no copy stream")
    x, y = loader._build(0, 0, np.arange(4), np.arange(4))
    if not (x.is_pinned() and y.is_pinned()):
        raise AssertionError("the CUDA loader's host batches are not pinned")
    for prefetch in (0, 2):
        _, got = epoch(ctx.device, prefetch, True)
        bad = [i for i, ((a, b), (c, d)) in enumerate(zip(expected, got))
               if not (torch.allclose(a, c, rtol=1e-5) and torch.equal(b, d))]
        if bad or len(got) != len(expected):
            raise AssertionError(f"prefetch {prefetch}: batches {bad} differ from the CPU loader's")
    return f"pinned host batches, copy stream; {len(expected)} batches equal the CPU loader's (prefetch 0 and 2)"


def pipeline_args(ctx: Context, stages: str, *extra: str) -> list[str]:
    """`python -m pipeline run` on the synthetic set, small-cnn (tiny-cnn in a rehearsal)."""
    arch = "tiny-cnn" if ctx.quick else "small-cnn"
    sets = [f"run.device={ctx.device.type}", "data.dataset=benchmarks.gpu_check:synthetic_cifar",
            "data.num_labeled=500", "pool.limit=2000", f"teacher.arch={arch}", "teacher.epochs=1",
            "teacher.batch_size=128", f"mart.arch={arch}", "mart.epochs=1",
            f"mart.epoch_size={256 if ctx.quick else 1024}", f"mart.batch_size={64 if ctx.quick else 128}", "mart.epsilon=0.031", "mart.step_size=0.007",
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
    from ml.models import load_model

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
        raise AssertionError(f"only {agreement:.3f} of the {ctx.device.type} pseudo-labels agree with the teacher on CPU")
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


def check_ddp_nccl(ctx: Context) -> str:
    if ctx.rehearsal:
        raise Skipped("NCCL needs CUDA (ddp-gloo runs the same worker on the CPU)")
    return run_ddp_worker(ctx.device, timeout=180)


def wrn_check(precision: str, *, channels_last: bool = False, compile: bool = False) -> Callable[[Context], str]:
    def check(ctx: Context) -> str:
        from benchmarks.bench_mart import StageLoop, synthetic_training_data
        from ml.models import build_model

        arch, batch, timed, warmup = ("tiny-cnn", 16, 2, 1) if ctx.quick else ("wrn-28-10", 256, 20, 3)
        if precision == "bf16" and ctx.rehearsal:
            from ml.devices import native_bf16

            if not native_bf16(ctx.device):
                raise Skipped("this CPU has no native bf16")
        torch.manual_seed(0)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        data = synthetic_training_data((32, 32, 3), 4096 if not ctx.quick else 64, 8192 if not ctx.quick else 64)
        loop = StageLoop(build_model(arch, num_classes=10, in_channels=3), **data, batch_size=batch,
                         batches_per_epoch=timed, steps=PGD_STEPS, precision=precision, channels_last=channels_last,
                         compile=compile, device=str(ctx.device))
        started = time.perf_counter()
        loop.warm_up(warmup)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        images = loop.epoch()  # synchronizes at its end
        rate = images / (time.perf_counter() - started)
        flops = mart_flops_per_image(arch)["total"]
        tflops = rate * flops / 1e12
        name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
        peak = peak_tflops(name, precision)
        mfu = f"MFU {100 * tflops / peak:.1f}% of {peak:g} ({'bf16' if precision != 'fp32' else 'TF32'} dense peak assumed for {name})" \
            if peak else f"no peak known for {name!r}"
        memory = f", peak memory {torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30:.1f} GiB" \
            if ctx.device.type == "cuda" else ""
        return (f"{arch} batch {batch}: {rate:.0f} img/s, {tflops:.1f} TFLOP/s, {mfu}; warm-up {warmup_s:.0f} s"
                f"{memory}")
    return check


# -- the table --------------------------------------------------------------------------------------------
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
}


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    table = main()
    sys.exit(1 if (table["status"] == "FAIL").any() else 0)
