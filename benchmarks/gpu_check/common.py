"""What the checks share: the context they run in, the card peaks, synthetic data, a tiny MART training,
and the one-line messages of a failure."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
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


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
