"""Resumable training: the full training state saved and restored (weights, optimizer, schedule, EMA,
the loader's position, every RNG state), and the seeds of the random streams that are drawn afresh
from (seed, epoch, batch, ...) instead, so a killed run ends, on CPU, with an uninterrupted run's weights.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ml.checkpoints import read_checkpoint
from ml.devices import unwrap
from pipeline.core.atomic import atomic_torch_save

STATE_FILE = "train_state.pt"  # in the stage's partial directory; removed when the stage completes


def seed_from(*keys: int) -> int:
    """A torch seed that depends only on `keys` (e.g. seed, epoch, batch, rank)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator on `device` seeded by `keys`."""
    return torch.Generator(device=device).manual_seed(seed_from(*keys))


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        # This process's GPU only: the _all variants switch to every visible GPU, and under torchrun
        # each rank would open a context (hundreds of MB) on every GPU of its node.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
        # numpy's state as tensors and ints so the checkpoint loads with weights_only=True
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_training_state(path: Path, *, model, optimizer, scheduler, loader, ema, progress: dict) -> None:
    """`loader.state_dict()` is the position after the last batch consumed (its worker runs ahead)."""
    atomic_torch_save({
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "loader": loader.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": rng_state(),
        "progress": progress,
    }, path)


def load_training_state(path: Path, *, model, optimizer, scheduler, loader, ema, map_location) -> dict | None:
    """Restore everything saved by save_training_state; None when there is nothing to resume.

    Under torchrun rank 0 saves and every rank loads the same file (the work dir is on a filesystem all
    ranks share), so every rank resumes with the same weights, optimizer state and loader position.
    """
    if not Path(path).exists():
        return None
    state = read_checkpoint(path, what="Training state", map_location=map_location,
                            fix="Delete it to restart the stage from its first epoch.")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    loader.load_state_dict(state["loader"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    return state["progress"]
