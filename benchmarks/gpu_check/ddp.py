"""DDP at world size 1: gloo in this process, NCCL in a subprocess (a hung NCCL must not hang the whole
check); the DDP-wrapped MART steps give the plain model's weights."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from benchmarks.gpu_check.common import (
    ROOT,
    Context,
    Skipped,
    last_line,
    max_weight_difference,
    tiny_training,
    train_tiny,
)


def check_ddp_gloo(ctx: Context) -> str:
    return ddp_worker("cpu")  # in this process: gloo at world size 1 does not hang, and saves a torch import


def check_ddp_nccl(ctx: Context) -> str:
    if ctx.rehearsal:
        raise Skipped("NCCL needs CUDA (ddp-gloo runs the same worker on the CPU)")
    return run_ddp_worker(ctx.device, timeout=180)


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
