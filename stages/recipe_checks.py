"""Cross-checks shared by the training stages' sections (teacher, mart): the learning-rate schedule
against the epochs, and the global batch against torchrun's world size. Plain functions on a section's
dataclass; `refuse(key, problem, fix)` is the engine's, and returns the UserError to raise."""
from __future__ import annotations

from pipeline.core.checks import Range, at_least, below_1, positive

MAX_EPOCHS = 10**6  # more is a typo (a million passes over the data), not a recipe
MAX_BATCH = 2**24  # images per step; far beyond any accelerator's memory

TRAINING_RANGES: dict[str, Range | tuple] = {
    "epochs": at_least(1, high=MAX_EPOCHS),
    "batch_size": at_least(1, high=MAX_BATCH),
    "lr": positive(),
    "momentum": below_1("0.9 in the reference recipes"),
    "weight_decay": at_least(0),
    "schedule": ("cosine", "piecewise", "constant"),
}


def check_schedule(section: str, c, refuse) -> None:
    if c.schedule == "piecewise" and not c.milestones:
        raise refuse(f"{section}.schedule", f"a piecewise schedule needs `{section}.milestones`, the epochs after "
                                            "which the learning rate is multiplied by 0.1, and it has none",
                     f"Set them (e.g. --set {section}.milestones=[{max(1, c.epochs * 3 // 4)}]) or use "
                     f"--set {section}.schedule=cosine.")
    outside = [m for m in c.milestones if not 1 <= m <= c.epochs - 1]
    if outside:
        early = outside[0] < 1
        raise refuse(f"{section}.milestones", f"milestone {outside[0]} is outside 1..{c.epochs - 1}: with "
                                              f"{section}.epochs = {c.epochs} it would "
                                              + ("act before training starts" if early else "never be reached"),
                     f"Give epoch counts between 1 and {section}.epochs - 1"
                     + (f" (for a lower rate from the start, lower `{section}.lr`)." if early else "."))


def check_batch_splits(section: str, batch: int, world_size: int, refuse) -> None:
    """Training batches are global and split across torchrun's ranks (data/mixed.py)."""
    if world_size > 1 and batch % world_size:
        raise refuse(f"{section}.batch_size", f"the global batch is split evenly across the {world_size} "
                                              "torchrun processes, and it is not a multiple of that",
                     f"Use a multiple of {world_size} (e.g. --set {section}.batch_size="
                     f"{max(world_size, batch // world_size * world_size)}) or change --nproc_per_node.")
