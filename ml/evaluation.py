"""Accuracy of a model on a labeled array, clean or under an attack (fp32, eval mode, sharded across
torchrun ranks), the training stages' final scoring of their saved checkpoints, and results.csv."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm import tqdm

from ml.attacks import ExampleSeeds
from ml.checkpoints import load_model
from ml.devices import resolve_device
from ml.resume import seed_from
from pipeline.core import distributed
from pipeline.core.atomic import atomic_write_csv

RESULT_COLUMNS = ["model", "split", "attack", "eps", "accuracy", "n"]


def to_tensor_images(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1] on `device` (converted there: 4x less traffic than float)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, *, device: torch.device,
             batch_size: int = 256, attack: Callable | None = None, seed: int = 0, desc: str = "eval",
             rank: int = 0, world_size: int = 1, output_dtypes: set | None = None) -> float:
    """Accuracy on (images, labels), optionally under `attack(model, x, y, generator)`.

    Meant for fp32 and eval mode, whatever the training precision: low-precision gradients can vanish and
    overstate robustness (`output_dtypes` collects the logits' dtypes, for a check that it was fp32). An
    attack's random start for image i comes from a stream seeded by (seed, i) (attacks.ExampleSeeds), so
    neither the batch size nor the sharding changes an accuracy. With `world_size` > 1 every rank calls
    this with the same arguments: each scores a contiguous run of whole batches and the correct counts
    are summed, so every image counts exactly once (no DistributedSampler padding) and the accuracy is
    the single-process one, on every rank.
    """
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first, stop = distributed.shard_range(len(images), rank, world_size, block=batch_size)
    starts = range(first, stop, batch_size)
    for start in tqdm(starts, desc=desc, leave=False, disable=rank != 0):
        x = to_tensor_images(images[start:start + batch_size], device)
        y = torch.from_numpy(np.asarray(labels[start:start + batch_size], dtype=np.int64)).to(device)
        if attack is not None:
            x = attack(model, x, y, ExampleSeeds([seed_from(seed, i) for i in range(start, start + len(y))], device))
        with torch.no_grad():
            logits = model(x)
        correct += (logits.argmax(1) == y).sum()
        if output_dtypes is not None:
            output_dtypes.add(logits.dtype)
    if world_size > 1:
        distributed.all_reduce_sum(correct)
    return correct.item() / max(1, len(images))


def write_results(path: Path, rows: list[dict]) -> None:
    """results.csv: model, split, attack, eps, accuracy, n (accuracy as a fraction)."""
    atomic_write_csv(path, pd.DataFrame(rows, columns=RESULT_COLUMNS))


def score_checkpoints(out_dir: Path, checkpoints: Mapping[str, str],
                      attacks: Mapping[str, tuple[Callable | None, float]], images: np.ndarray, labels: np.ndarray,
                      *, run_cfg, dist, batch_size: int = 256, log: Callable[[str], None] = print) -> list[dict]:
    """Score each saved checkpoint (model name -> file in out_dir) under each attack (name -> (attack or
    None for clean, eps)) and write results.csv; returns its rows.

    The saved files are measured, not the live modules: what users load is what gets measured. Under
    torchrun every rank waits for rank 0's files, then scores its shard of the images.
    """
    distributed.barrier()
    device = resolve_device(run_cfg.device, dist.local_rank)
    rows = []
    for name, filename in checkpoints.items():
        model = load_model(Path(out_dir) / filename, device=device, channels_last=run_cfg.channels_last)
        for attack_name, (attack, eps) in attacks.items():
            accuracy = evaluate(model, images, labels, device=device, batch_size=batch_size, attack=attack,
                                seed=run_cfg.seed, desc=f"{name} {attack_name}", rank=dist.rank,
                                world_size=dist.world_size)
            rows.append({"model": name, "split": "test", "attack": attack_name, "eps": eps, "accuracy": accuracy,
                         "n": len(labels)})
            log(f"  {name} {attack_name}: {accuracy:.4f}")
    if dist.is_main:
        write_results(Path(out_dir) / "results.csv", rows)
    return rows
