"""WRN-28-10 MART: FLOPs per image counted on the meta device, and images/s and model FLOP utilisation
through the stage's step (benchmarks.bench_mart.StageLoop)."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.gpu_check.common import PGD_STEPS, Context, Skipped, peak_tflops


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
        assumed = f"{'bf16' if precision != 'fp32' else 'TF32'} dense peak assumed for {name}"
        mfu = f"MFU {100 * tflops / peak:.1f}% of {peak:g} ({assumed})" if peak else f"no peak known for {name!r}"
        memory = f", peak memory {torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30:.1f} GiB" \
            if ctx.device.type == "cuda" else ""
        return (f"{arch} batch {batch}: {rate:.0f} img/s, {tflops:.1f} TFLOP/s, {mfu}; warm-up {warmup_s:.0f} s"
                f"{memory}")
    return check
