"""The config's checks: every value's range and the values against each other (and the training batches
against torchrun's world size), each refusal a UserError naming the key, its value, where it was set
and the fix. Run by `load_config` after the overrides; `check_against_labeled` once the labeled set is open.
No torch here: `status` must stay quick."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.distributed import dist_info
from pipeline.core.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import Config

_CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),  # and cuda:N
    "run.precision": ("fp32", "bf16", "fp16", "auto"),
    "teacher.schedule": ("cosine", "piecewise", "constant"),
    "mart.schedule": ("cosine", "piecewise", "constant"),
    "mart.loss": ("mart", "trades", "pgd-at"),
}

# The names the eval stage accepts (ml.robustness imports torch, so they are repeated here; a test keeps them equal).
EVAL_MODELS = ("mart", "mart-last", "teacher")
EVAL_ATTACK = re.compile(r"clean|fgsm|autoattack|autoattack-fast|apgd-ce|apgd-dlr|apgd-t|fab|fab-t|square|(pgd|cw)[1-9][0-9]*")

_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: v > 0, "> 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_BELOW_1 = (lambda v: 0 <= v < 1, "in [0, 1)")

# Every number's allowed range, with what the value means where that helps to choose a fix.
_RANGES = {
    "run.seed": (*_AT_LEAST_0, ""),
    "run.num_workers": (*_AT_LEAST_0, ""),
    "run.checkpoint_every_s": (*_AT_LEAST_0, "seconds between mid-epoch checkpoints; 0 = after every step"),
    "data.num_labeled": (*_AT_LEAST_0, "0 = the whole training split"),
    "pool.limit": (*_AT_LEAST_0, "0 = the whole pool"),
    "pseudolabel.batch_size": (*_AT_LEAST_1, ""),
    "pseudolabel.dedup_threshold": (*_POSITIVE, "an L2 distance on [0, 1] pixels; RST used 2000/255 = 7.843"),
    "mart.epoch_size": (*_AT_LEAST_0, "0 = as many examples as labeled images"),
    "mart.beta": (*_AT_LEAST_0, "the weight of the robust term; the papers use 5 or 6"),
    "mart.epsilon": (*_POSITIVE, "the L-inf radius on [0, 1] pixels, e.g. 0.031 for 8/255"),
    "mart.step_size": (*_POSITIVE, "the PGD step on [0, 1] pixels, e.g. 0.007 with epsilon 0.031"),
    "mart.steps": (*_AT_LEAST_1, ""),
    "mart.unsup_fraction": (*_FRACTION, "the share of each batch drawn from the pool"),
    "mart.ema_decay": (*_BELOW_1, "0 = no EMA, e.g. 0.995"),
    "mart.val_size": (*_AT_LEAST_0, "0 = no validation split"),
    "mart.eval_n": (*_AT_LEAST_0, "0 = the whole test set"),
    "mart.eval_batch_size": (*_AT_LEAST_1, ""),
    "mart.label_smoothing": (*_BELOW_1, "0 = one-hot targets; DM-AT uses 0.1"),
    "mart.pool_label_smoothing": (*_BELOW_1, "0 = one-hot targets for the pool's pseudo-labels"),
    "mart.pool_cutmix": (*_FRACTION, "the probability that a pool example gets a CutMix box; 0 = no CutMix"),
    "mart.pool_loss_weight": (*_AT_LEAST_0, "1 = pool examples count as much as labeled ones"),
    "eval.n": (*_AT_LEAST_0, "0 = the whole test set"),
    "eval.eps": (*_AT_LEAST_0, "0 = the training radius mart.epsilon"),
    "eval.batch_size": (*_AT_LEAST_1, ""),
}
for _section in ("teacher", "mart"):
    _RANGES.update({
        f"{_section}.epochs": (*_AT_LEAST_1, ""),
        f"{_section}.batch_size": (*_AT_LEAST_1, ""),
        f"{_section}.lr": (*_POSITIVE, ""),
        f"{_section}.momentum": (*_BELOW_1, "0.9 in the reference recipes"),
        f"{_section}.weight_decay": (*_AT_LEAST_0, ""),
    })


def validate(config: Config, *, world_size: int | None = None, sources: dict[str, str] | None = None) -> None:
    """Refuse, with a UserError naming the key, its value and the fix, any value a stage would crash on or
    silently misuse. `world_size` defaults to torchrun's WORLD_SIZE (1 without torchrun); `sources` maps
    "section.key" to where the value was set, for the message."""
    world_size = dist_info().world_size if world_size is None else world_size

    def refuse(key: str, problem: str, fix: str) -> UserError:
        where = "" if sources is None else f" (set by {sources[key]})" if key in sources else " (the default)"
        fix = fix or f"Change it in the [{key.split('.')[0]}] section of the config file, or with --set {key}=VALUE."
        return UserError(f"`{key}` is {_value(config, key)!r}{where}; {problem}. {fix}")

    for key, choices in _CHOICES.items():
        value = _value(config, key)
        if value not in choices and not (key == "run.device" and re.fullmatch(r"cuda:[0-9]+", value)):
            also = " or cuda:N" if key == "run.device" else ""
            raise refuse(key, f"it must be one of {', '.join(choices)}{also}", "")
    for key, (ok, rule, meaning) in _RANGES.items():
        value = _value(config, key)
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            raise refuse(key, f"it must be {'a finite number ' if isinstance(value, float) else ''}{rule}"
                              + (f" ({meaning})" if meaning else ""), "")
    pool_in_memory = config.mart.pool_in_memory
    if pool_in_memory != "auto" and not _is_number_at_least_0(pool_in_memory):
        raise refuse("mart.pool_in_memory", "it must be \"auto\" or a number of GiB >= 0 (0 reads the pool from "
                                            "pseudolabels.h5 in chunks)", "")
    for section in ("teacher", "mart"):
        _check_schedule(config, section, refuse)
    if config.data.num_labeled > 0:
        _check_val_size(config, config.data.num_labeled, refuse)
    _check_world_size(config, world_size, refuse)
    _check_eval(config, refuse)


def check_against_labeled(config: Config, num_labeled_images: int) -> None:
    """Once the labeled set is open (its size known even when data.num_labeled = 0): refuse a
    validation split that would leave no labeled image to train on."""
    def refuse(key: str, problem: str, fix: str) -> UserError:
        return UserError(f"`{key}` is {_value(config, key)!r}; {problem}. {fix}")

    _check_val_size(config, num_labeled_images, refuse)


def _value(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _is_number_at_least_0(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and value >= 0


def _check_schedule(config: Config, section: str, refuse) -> None:
    c = getattr(config, section)
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


def _check_val_size(config: Config, num_labeled_images: int, refuse) -> None:
    if config.mart.val_size >= num_labeled_images:
        raise refuse("mart.val_size", f"the validation split must be smaller than the {num_labeled_images} "
                                      "labeled images, or no labeled image is left to train on",
                     f"Hold out fewer (e.g. --set mart.val_size={num_labeled_images // 10}), label more "
                     "(data.num_labeled), or use 0 to keep the last epoch without a validation split.")


def _check_world_size(config: Config, world_size: int, refuse) -> None:
    """Training batches are global and split across torchrun's ranks (data/mixed.py). Evaluation and
    pseudo-labeling batches are not split (each rank takes whole batches), so they need no check."""
    if world_size <= 1:
        return
    for section in ("teacher", "mart"):
        batch = getattr(config, section).batch_size
        if batch % world_size:
            raise refuse(f"{section}.batch_size", f"the global batch is split evenly across the {world_size} "
                                                  "torchrun processes, and it is not a multiple of that",
                         f"Use a multiple of {world_size} (e.g. --set {section}.batch_size="
                         f"{max(world_size, batch // world_size * world_size)}) or change --nproc_per_node.")
    # Each rank takes its slice of the batch's labeled part and of its pool part; the last rank gets the
    # smallest slices, and must not get an empty batch.
    pool_rows = round(config.mart.batch_size * config.mart.unsup_fraction)  # as MixedBatchSampler splits
    labeled_rows = config.mart.batch_size - pool_rows
    if labeled_rows // world_size + pool_rows // world_size < 1:
        raise refuse("mart.batch_size", f"split into {labeled_rows} labeled and {pool_rows} pool images, each "
                                        f"shared among {world_size} processes, it leaves some process an "
                                        "empty batch", f"Use a batch of at least {2 * world_size}.")


def _check_eval(config: Config, refuse) -> None:
    # Anything else is a checkpoint file to import (it must exist).
    unknown = [m for m in config.eval.models if m not in EVAL_MODELS and not Path(m).is_file()]
    if unknown or not config.eval.models:
        raise refuse("eval.models", f"{f'{unknown[0]!r} is neither a model nor an existing file' if unknown else 'it names no model'}; "
                                    f"the models are {', '.join(EVAL_MODELS)} or checkpoint files",
                     "List some of them, e.g. --set eval.models=mart,teacher,/models/theirs.pt.")
    unknown = [a for a in config.eval.attacks if not EVAL_ATTACK.fullmatch(a)]
    if unknown:
        raise refuse("eval.attacks", f"{unknown[0]!r} is not an attack; the forms are clean, fgsm, pgdN and "
                                     "cwN (N steps, e.g. pgd20, cw30), autoattack, autoattack-fast (its "
                                     "apgd-ce and apgd-t only), or one AutoAttack part "
                                     "(apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square)",
                     "Fix the name, e.g. --set eval.attacks=clean,pgd20,autoattack.")
    bad = [m for m in config.eval.sweep if not (math.isfinite(m) and m > 0)]
    if bad:
        raise refuse("eval.sweep", f"{bad[0]!r} is not a positive multiple of eps (the PGD-20 curve is "
                                   "measured at eps x each item)", "Use numbers > 0, e.g. --set eval.sweep=0.5,1,2.")
