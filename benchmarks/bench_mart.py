"""MART training throughput: the stage's training step against a bare loop of the same algorithm.

Measured: `ml.training.train_one_epoch` with the objects the mart stage builds (ml.training.set_up):
the real `MixedBatchSampler` + `MixedBatchLoader` (labeled and pool images in memory, unsup_fraction 0.5,
prefetch as `data.mixed.prefetch_depth` sizes it, no augmentation, as in configs/demo.toml), the
stage's training attack (PGD from x + 0.001 N(0, 1), eval mode), `LOSSES["mart"]`, SGD with momentum and
weight decay, the per-step LambdaLR and the running sums; model from `devices.prepare_for_training`.
Reference: the same algorithm written straight-line over one batch already in memory as float NCHW (no
sampler, no loader, no scheduler): eval-mode PGD, train-mode natural and adversarial forwards, the
official MART loss, SGD step, in fp32. Same architecture and initial weights on both sides. With bf16
settings the bare loop also runs in bf16 autocast on channels_last (reported in the bf16 lines' note:
what the arithmetic allows, to tell a bf16 shortfall from stage overhead).

Two models (MODELS): tiny-cnn 28x28x1 batch 64 PGD-3 (where per-step host work shows most) and small-cnn
32x32x3 batch 128 PGD-10. Stage settings: fp32, fp32+channels_last (run.channels_last) and, on CPUs with
native bf16 (AVX-512 BF16 or AMX), bf16+channels_last. Targets (issue 14): stage fp32 >= 1.0x the bare
loop on tiny-cnn and >= 1.05x on small-cnn (channels_last allowed: the better fp32 setting counts);
bf16+channels_last >= 2.5x the bare fp32 loop.

Every configuration gets one warm-up batch (oneDNN primitive creation), then `rounds` interleaved timed
passes (bare, stage settings, bare, ...) of `train_steps` batches; images/s = batch / the median step
time over all its passes (a stage step is timed from one batch request to the next, so gathering the
batch counts). Runtime: about 2 minutes on 2 idle cores; --quick about 1 minute.
"""
from __future__ import annotations

import argparse
import copy
import functools
import itertools
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import Comparison, machine, median_step_rates, print_header, synthetic_images, timed_iter
from ml.devices import native_bf16
from pipeline.core.host_memory import keep_freed_memory

EPSILON = 8 / 255  # the CIFAR-10 training radius of MART
STEP_SIZE = 0.007  # MART's PGD step for CIFAR-10
BETA = 6.0


# -- the reference: the algorithm, straight-line ---------------------------------------------------------
def reference_mart_loss(logits_natural, logits_adv, y, beta=BETA):
    """The official MART loss (YisenWang/MART train_wrn.py), written out again here on purpose."""
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits_natural, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze(1)
    loss_robust = (1.0 / len(y)) * torch.sum(
        torch.sum(F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none"), dim=1)
        * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


def reference_step(model: nn.Module, optimizer, x, y, *, steps: int, eps: float = EPSILON,
                   step_size: float = STEP_SIZE) -> torch.Tensor:
    # PGD in eval mode from x + 0.001 N(0, 1).
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0.0, 1.0)
    # Natural and adversarial forwards in train mode, MART loss, SGD step.
    model.train()
    loss = reference_mart_loss(model(x), model(x_adv), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# -- the stage's loop ------------------------------------------------------------------------------------
class StageLoop:
    """The mart stage's training objects (sampler, loader, placed model, optimizer, schedule, training attack,
    loss) for one setting, built as ml.training.set_up builds them around a given model; `epoch()`
    trains one epoch through ml.training.train_one_epoch, the stage's step."""

    def __init__(self, model: nn.Module, *, images, labels, pool_images, pool_labels, batch_size: int,
                 batches_per_epoch: int, steps: int, precision: str, seed: int = 0, unsup_fraction: float = 0.5,
                 channels_last: bool = False, compile: bool = False, device: str = "cpu",
                 prefetch: int | None = None, augment: bool = True):
        from data.augment import augmenter
        from data.mixed import MixedBatchLoader, MixedBatchSampler, prefetch_depth
        from ml import training
        from ml.attacks import training_attack
        from ml.devices import attack_forward, prepare_for_training, resolve_precision
        from ml.losses import LOSSES
        from ml.optim import make_optimizer, make_scheduler
        from pipeline.config import RunConfig

        self.training = training
        self.device = torch.device(device)
        self.batch_size = batch_size
        run_cfg = RunConfig(device=device, precision=precision, channels_last=channels_last, compile=compile)
        train_model, scaler = prepare_for_training(model, run_cfg=run_cfg, device=self.device, distributed=False)
        sampler = MixedBatchSampler(len(images), len(pool_labels), batch_size=batch_size,
                                    unsup_fraction=unsup_fraction, epoch_size=batch_size * batches_per_epoch, seed=seed)
        loader = MixedBatchLoader(sampler, images, labels, pool_images, pool_labels, device=self.device,
                                  augment=augmenter(augment, images.shape[1]), seed=seed,
                                  prefetch=prefetch_depth(run_cfg.num_workers, self.device) if prefetch is None
                                  else prefetch,
                                  channels_last=channels_last)
        optimizer = make_optimizer(model, lr=0.01, momentum=0.9, weight_decay=3.5e-3)
        scheduler = make_scheduler(optimizer, schedule="constant", epochs=1, steps_per_epoch=len(sampler))
        attack = training_attack("mart", eps=EPSILON, step_size=STEP_SIZE, steps=steps)
        # train_one_epoch applies the recipe's loss, attack and options; arch and the schedule are set_up's.
        recipe = training.Recipe(arch="", epochs=1, batch_size=batch_size, epoch_size=batch_size * batches_per_epoch,
                                 lr=0.01, momentum=0.9, weight_decay=3.5e-3, schedule="constant",
                                 loss=functools.partial(LOSSES["mart"], beta=BETA), attack=attack, augment=augment,
                                 unsup_fraction=unsup_fraction)
        self.t = training.Training(model=train_model, optimizer=optimizer, scheduler=scheduler, loader=loader,
                                   recipe=recipe, device=self.device,
                                   precision=resolve_precision(precision, self.device), seed=seed, scaler=scaler,
                                   attack_model=attack_forward(model, compile))
        self._epoch = 0

    def _train(self, batches) -> dict:
        return self.training.train_one_epoch(self.t, self._epoch, batches=batches, progress_bar=False)

    def warm_up(self, batches: int = 1) -> None:
        self.t.loader.sampler.set_epoch(self._epoch)
        self._train(itertools.islice(iter(self.t.loader), batches))
        self.t.loader.close()
        self._epoch += 1

    def epoch(self, step_seconds: list | None = None) -> int:
        """One epoch through the real loader; returns the images trained on. With `step_seconds`, each
        step's seconds (its batch's wait + its compute; CPU only: CUDA steps are asynchronous) go there."""
        self.t.loader.sampler.set_epoch(self._epoch)
        loader = self.t.loader
        stats = self._train(loader if step_seconds is None else timed_iter(loader, step_seconds))
        self._epoch += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if not np.isfinite(stats["loss"]):
            raise FloatingPointError(f"MART loss is {stats['loss']}")
        return len(loader) * self.batch_size


def synthetic_training_data(shape, num_labeled: int, num_pool: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return dict(images=synthetic_images(num_labeled, shape, seed),
                labels=rng.integers(0, 10, num_labeled).astype(np.int64),
                pool_images=synthetic_images(num_pool, shape, seed + 1),
                pool_labels=rng.integers(0, 10, num_pool).astype(np.int64))


def parse_setting(setting: str) -> dict:
    """"bf16+channels_last" -> {"precision": "bf16", "channels_last": True}."""
    precision, *flags = setting.split("+")
    unknown = set(flags) - {"channels_last"}
    if precision not in ("fp32", "bf16") or unknown:
        raise ValueError(f"unknown stage setting {setting!r}")
    return {"precision": precision, "channels_last": "channels_last" in flags}


# name -> (arch, image shape, batch size, PGD steps, fp32 target, the fp32 setting it applies to: the stage
# may use channels_last where it helps, and it helps both; plain fp32 is reported without a target)
MODELS = {
    "tiny-cnn": ("tiny-cnn", (28, 28, 1), 64, 3, 1.0, "fp32+channels_last"),
    "small-cnn": ("small-cnn", (32, 32, 3), 128, 10, 1.05, "fp32+channels_last"),
}
BF16_TARGET = 2.5


def bench_mart(arch: str = "small-cnn", shape=(32, 32, 3), batch_size: int = 128, steps: int = 10,
               train_steps: int = 3, rounds: int = 2, num_labeled: int = 2048, num_pool: int = 4096,
               stage_settings=("fp32", "bf16"), fp32_target: float = 1.0, fp32_setting: str = "fp32") -> dict:
    """images/s of the stage's MART step for each of `stage_settings` ("fp32", "bf16", optionally
    "+channels_last", i.e. run.channels_last) and of the bare fp32 reference loop, side by side."""
    from ml.models import build_model

    torch.manual_seed(0)
    initial = build_model(arch, num_classes=10, in_channels=shape[2])
    data = synthetic_training_data(shape, num_labeled, num_pool)

    # The reference's batch: the same kind of images, already float NCHW in memory.
    x = torch.from_numpy(data["images"][:batch_size]).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(np.random.default_rng(3).integers(0, 10, batch_size).astype(np.int64))
    reference_model = copy.deepcopy(initial)
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)

    def reference_pass(step_seconds: list) -> None:
        for _ in range(train_steps):
            began = time.perf_counter()
            loss = reference_step(reference_model, reference_optimizer, x, y, steps=steps)
            step_seconds.append(time.perf_counter() - began)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"reference MART loss is {loss}")

    # The bare loop in bf16 autocast on channels_last too (the model and its batch): what the arithmetic
    # allows, so a bf16 shortfall against the target can be told from stage overhead.
    bf16_model = copy.deepcopy(initial).to(memory_format=torch.channels_last)
    bf16_optimizer = torch.optim.SGD(bf16_model.parameters(), lr=0.01, momentum=0.9, weight_decay=3.5e-3)
    x_nhwc = x.contiguous(memory_format=torch.channels_last)

    def reference_bf16_pass(step_seconds: list) -> None:
        for _ in range(train_steps):
            began = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                reference_step(bf16_model, bf16_optimizer, x_nhwc, y, steps=steps)
            step_seconds.append(time.perf_counter() - began)

    stage_loops = {s: StageLoop(copy.deepcopy(initial), **data, batch_size=batch_size, batches_per_epoch=train_steps,
                                steps=steps, augment=False, **parse_setting(s))
                   for s in stage_settings}
    reference_step(reference_model, reference_optimizer, x, y, steps=steps)
    for loop in stage_loops.values():
        loop.warm_up()

    passes = {"reference_fp32": reference_pass}
    if any(parse_setting(s)["precision"] == "bf16" for s in stage_settings):
        reference_bf16_pass([])  # warm-up
        passes["reference_bf16+channels_last"] = reference_bf16_pass
    passes.update({f"stage_{s}": loop.epoch for s, loop in stage_loops.items()})
    started = time.perf_counter()
    rates = median_step_rates(passes, rounds, items_per_step=batch_size)
    result = {f"{name}_images_per_s": rate for name, rate in rates.items()}
    for s in stage_settings:
        result[f"ratio_stage_{s}_vs_reference_fp32"] = rates[f"stage_{s}"] / rates["reference_fp32"]
    result.update(arch=arch, shape=list(shape), batch_size=batch_size, pgd_steps=steps, train_steps=train_steps,
                  rounds=rounds, stage_settings=list(stage_settings), fp32_target=fp32_target,
                  fp32_setting=fp32_setting,
                  prefetch=stage_loops[stage_settings[0]].t.loader.prefetch, seconds=time.perf_counter() - started)
    return result


def fastest_setting() -> str:
    """The setting run.precision = "auto" with channels_last trains with on this CPU."""
    return "bf16+channels_last" if native_bf16(torch.device("cpu")) else "fp32+channels_last"


def fastest_stage_images_per_s(result: dict) -> float:
    """What training consumes at best: the fastest stage setting measured."""
    return max(result[f"stage_{s}_images_per_s"] for s in result["stage_settings"])


def comparisons(result: dict) -> list[Comparison]:
    shape = "x".join(map(str, result["shape"]))
    size = f"{result['arch']} {shape} batch {result['batch_size']}, PGD-{result['pgd_steps']}"
    bare_bf16 = result.get("reference_bf16+channels_last_images_per_s")

    def note(setting: str) -> str:
        if parse_setting(setting)["precision"] != "bf16" or bare_bf16 is None:
            return size
        return (f"{size}; bare bf16+channels_last {bare_bf16:.1f} img/s = "
                f"{bare_bf16 / result['reference_fp32_images_per_s']:.2f}x, stage/bare bf16 "
                f"{result[f'stage_{setting}_images_per_s'] / bare_bf16:.2f}x")

    def target(setting: str) -> float | None:
        if parse_setting(setting)["precision"] == "bf16":
            return BF16_TARGET
        return result["fp32_target"] if setting == result["fp32_setting"] else None  # the other one: informational

    return [Comparison("mart", f"{result['arch']} stage {s} vs bare fp32", f"stage {s}",
                       result[f"stage_{s}_images_per_s"], "bare fp32", result["reference_fp32_images_per_s"], "img/s",
                       ">=", target(s), note=note(s))
            for s in result["stage_settings"]]


def run(quick: bool = False) -> tuple[list[Comparison], dict]:
    """Both models; returns the comparisons and small-cnn's result (the consumer bench_loader compares with)."""
    print_header("mart: the stage's training step vs a bare MART loop")
    keep_freed_memory()  # as the runner does before every stage (process-wide: the bare side runs with it too)
    if native_bf16(torch.device("cpu")):
        settings = ("fp32", "fp32+channels_last", "bf16+channels_last")
    else:
        # Emulated bf16 runs several times slower than fp32; run.precision = "auto" never picks it here.
        print("bf16: not measured, no native bf16 here (no AVX-512 BF16 / AMX, or ONEDNN_MAX_CPU_ISA below them)")
        settings = ("fp32", "fp32+channels_last")
    rows, results = [], {}
    for name, (arch, shape, batch_size, steps, target, fp32_setting) in MODELS.items():
        result = bench_mart(arch=arch, shape=shape, batch_size=batch_size, steps=steps,
                            train_steps=4 if quick else 8, rounds=2, stage_settings=settings, fp32_target=target,
                            fp32_setting=fp32_setting)
        results[name] = result
        for c in comparisons(result):
            print(c.line(), flush=True)
            rows.append(c)
    print(machine(), flush=True)
    return rows, results["small-cnn"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(quick=parser.parse_args().quick)
