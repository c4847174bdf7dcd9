"""The section every training stage's config extends ([teacher], [mart]): the keys they share, their
ranges, and the cross-checks on them (the learning-rate schedule against the epochs, the global batch
against torchrun's world size). `refuse(key, problem, fix)` is the engine's, and returns the UserError
to raise."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

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


@dataclass
class TrainingSection:
    """The keys of a training stage's section. A stage's dataclass extends it, redeclaring a key to give
    it another default (the key keeps its place), and names its section in SECTION."""

    SECTION: ClassVar[str] = ""  # the stage's config section, for the messages
    RANGES: ClassVar[dict] = TRAINING_RANGES

    arch: str = "small-cnn"  # see ml.models.ARCHS
    epochs: int = 10  # training epochs (the teacher's: passes over the labeled set)
    batch_size: int = 128  # images per optimizer step
    lr: float = 0.05  # SGD learning rate at the start of the schedule
    momentum: float = 0.9  # SGD momentum (Nesterov off, as in the reference recipes)
    weight_decay: float = 5e-4  # L2 penalty on all parameters
    schedule: str = "cosine"  # cosine | piecewise (needs milestones) | constant
    milestones: list[int] = field(default_factory=list)  # piecewise: lr x0.1 after each of these epochs (1..epochs-1)
    augment: bool = True  # random crop (padding 3 at 28px, 4 at 32px) and horizontal flip

    def check(self, config, refuse, world_size: int) -> None:
        check_schedule(self.SECTION, self, refuse)
        check_batch_splits(self.SECTION, self.batch_size, world_size, refuse)


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
