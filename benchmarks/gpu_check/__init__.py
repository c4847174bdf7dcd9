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
mean nothing; no time limit). --quick shrinks every size (the tests use it). Runtime: the CPU-side checks
about 1 minute on 2 cores; the whole default run is sized for under 8 minutes on one H100 (--limit-s: a
check whose budget would end past it is skipped; 15 s past the limit a watchdog dumps every thread's stack
and exits, the CSV holding the rows finished). Last seen: not yet run on a GPU (no GPU was lent to the
session that wrote it).

The checks live in modules by concern: common (the context, synthetic data, a tiny MART training),
loader, step (the fp16 scaler, compile), ddp, pipeline_runs (the CLI on the device), throughput (FLOPs,
WRN-28-10 images/s and MFU) and checks (the table of checks, the run over them, main).
"""
from __future__ import annotations

from benchmarks.gpu_check.checks import CHECKS, main
from benchmarks.gpu_check.common import peak_tflops, synthetic_cifar  # the latter for data.dataset
from benchmarks.gpu_check.throughput import mart_flops_per_image

__all__ = ["CHECKS", "main", "mart_flops_per_image", "peak_tflops", "synthetic_cifar"]
