"""One MART step through ml.training.train_one_epoch on the CPU: the fp16 GradScaler path, and torch.compile
of the model and the attack's forwards against eager."""
from __future__ import annotations

import copy
import time

import torch

from benchmarks.gpu_check.common import Context, Skipped, max_weight_difference, tiny_training, train_tiny


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
