"""The eval stage's machinery: trained checkpoints under a suite of white-box attacks, an accuracy-vs-eps
curve, and sanity checks that flag gradient masking and evaluation bugs.

Every number is measured on the first `eval.n` test images in dataset order, in fp32 and eval mode,
with random starts drawn per image from generators seeded by (run.seed, image index): a rerun reproduces
it, batch size and sharding do not change it, and
the same (attack, eps, images) asked twice (a headline attack that is also a sweep point) is run once.
AutoAttack is the exception to per-image seeds: pyautoattack seeds each part's batch with run.seed, and
it runs over the whole set part by part (run_autoattack) so that each part shows its progress.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ml.attacks import cw_linf, eval_attack, fgsm, input_gradient_norms
from ml.evaluation import evaluate, to_tensor_images
from pipeline.core import distributed
from pipeline.core.atomic import atomic_path
from pipeline.core.errors import UserError

AUTOATTACK_PARTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# The cheaper suite for quick checks: the standard one's first two parts (the gradient-based ones) with
# its settings. Its robust set is the standard suite's before FAB-T and Square, so it can only overstate
# robustness against `autoattack`, never understate it.
AUTOATTACK_FAST = "autoattack-fast"
FAST_PARTS = ("apgd-ce", "apgd-t")
AUTOATTACKS = ("autoattack", AUTOATTACK_FAST, *AUTOATTACK_PARTS)
ATTACK_FORMS = ("clean, fgsm, pgdN (PGD-CE with N steps, e.g. pgd20), cwN (PGD on the CW margin, e.g. cw30), "
                f"autoattack (the standard suite), {AUTOATTACK_FAST} (its apgd-ce and apgd-t only), or one "
                f"AutoAttack part ({', '.join(AUTOATTACK_PARTS)})")
SWEEP_ATTACK = "pgd20-sweep"
CHECK_COLUMNS = ["model", "check", "passed", "detail"]
CHECK_IMAGES = 256  # the checks' extra attack runs use at most this many images
TOLERANCE = 0.01  # accuracy slack in the comparisons (one image in a hundred)
LARGE_EPS = 0.5  # half the pixel range: every image can be pushed to mid-grey, so nothing should survive
LARGE_EPS_MAX_ACCURACY = 0.15
DLR_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}
MIN_NONZERO_GRADIENTS = 0.9  # fraction of images whose input gradient must be non-zero


# -- attacks -----------------------------------------------------------------------------------------
def build_attack(name: str, eps: float, *, seed: int = 0, log: Callable[[str], None] = print) -> Callable | None:
    """`attack(model, x, y, generator) -> x_adv` for `name`, or None for "clean"; UserError when unknown."""
    steps = re.fullmatch(r"(pgd|cw)([1-9][0-9]*)", name)
    if name == "clean":
        return None
    if name == "fgsm":
        return lambda model, x, y, generator: fgsm(model, x, y, eps=eps)
    if steps and steps[1] == "pgd":
        return eval_attack(eps, int(steps[2]))
    if steps:
        n = int(steps[2])
        return lambda model, x, y, generator: cw_linf(model, x, y, eps=eps, step_size=2.5 * eps / n, steps=n,
                                                      generator=generator)
    if name in AUTOATTACKS:
        forwarded: set[str] = set()  # AutoAttack warnings already logged, shared by this attack's batches
        return lambda model, x, y, generator: run_autoattack(model, x, y, name=name, eps=eps, seed=seed,
                                                             batch_size=len(x), log=log, forwarded=forwarded,
                                                             progress=False)[0]
    raise UserError(f"unknown attack {name!r} in eval.attacks; the forms are {ATTACK_FORMS}.")


def _adversary(model, name: str, eps: float, seed: int, num_classes: int, device):
    """pyautoattack's AutoAttack set up for `name`: the standard version's settings for the suites, the
    custom version's for a single part (as the package runs a part on its own)."""
    from pyautoattack import AutoAttack

    if name in AUTOATTACK_PARTS:
        if num_classes < DLR_MIN_CLASSES.get(name, 2):
            raise UserError(f"eval attack {name} needs at least {DLR_MIN_CLASSES[name]} classes (its DLR loss "
                            f"reads the runner-up logits); the model has {num_classes}. Use autoattack or apgd-ce "
                            "instead.")
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=[name], device=device,
                               seed=seed)
    else:
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=seed)
        if name == AUTOATTACK_FAST:
            adversary.attacks_to_run = list(FAST_PARTS)
        # The DLR losses read the 3rd and 4th largest logits: with fewer classes the suites keep their other
        # parts (CIFAR-10 and Fashion-MNIST, 10 classes, get them unchanged).
        adversary.attacks_to_run = [a for a in adversary.attacks_to_run if num_classes >= DLR_MIN_CLASSES.get(a, 2)]
    # Targeted parts aim at the 9 runner-up classes of a 10-class problem; fewer classes, fewer targets.
    adversary.apgd_targeted.n_target_classes = min(9, num_classes - 1)
    adversary.fab.n_target_classes = min(9, num_classes - 1)
    adversary.verbose = False
    return adversary


def _run_part(adversary, part: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One AutoAttack part on a batch, set up as AutoAttack.run_standard_evaluation sets it up."""
    if part in ("apgd-ce", "apgd-dlr"):
        adversary.apgd.loss = part.removeprefix("apgd-")
        adversary.apgd.seed = adversary.get_seed()
        return adversary.apgd.perturb(x, y)
    if part == "apgd-t":
        adversary.apgd_targeted.seed = adversary.get_seed()
        return adversary.apgd_targeted.perturb(x, y)
    if part in ("fab", "fab-t"):
        adversary.fab.targeted = part == "fab-t"
        if part == "fab-t":
            adversary.fab.n_restarts = 1
        adversary.fab.seed = adversary.get_seed()
        return adversary.fab.perturb(x, y)
    adversary.square.seed = adversary.get_seed()
    return adversary.square.perturb(x, y)


def run_autoattack(model, x: torch.Tensor, y: torch.Tensor, *, name: str, eps: float, seed: int, batch_size: int,
                   log: Callable[[str], None] = print, forwarded: set | None = None, progress: bool = True,
                   desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(x_adv, robust): AutoAttack `name` ("autoattack", "autoattack-fast" or one part) on all of (x, y),
    computed as pyautoattack's run_standard_evaluation(x, y, batch_size=batch_size) computes it (the same
    parts, settings, seeds and batches: each part in turn on the images still robust, batch_size at a
    time), but run here part by part so that each shows a progress bar (images left, robust so far, time
    left) and, with `progress`, logs its robust accuracy when done. The reference implementation does the
    attacking; its own seed makes it repeatable."""
    from pyautoattack import checks

    forwarded = set() if forwarded is None else forwarded
    model.eval()
    with torch.no_grad():
        num_classes = model(x[:1]).shape[1]
    adversary = _adversary(model, name, eps, seed, num_classes, x.device)
    logger = adversary.logger
    x_adv = x.clone()
    with _forward_warnings(logger, log, forwarded), torch.no_grad():
        # The package's checks for randomised, non-softmax-like or dynamic models: masking evidence.
        first = slice(0, batch_size)
        checks.check_randomized(adversary.get_logits, x[first], y[first], bs=batch_size, logger=logger)
        checks.check_range_output(adversary.get_logits, x[first], logger=logger)
        checks.check_dynamic(model, x[first], False, logger=logger)
        checks.check_n_classes(num_classes, adversary.attacks_to_run, adversary.apgd_targeted.n_target_classes,
                               adversary.fab.n_target_classes, logger=logger)
        robust = torch.cat([model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                            for i in range(0, len(x), batch_size)])
        accuracies = {"clean": robust.float().mean().item()}
        for part in adversary.attacks_to_run:
            targets = robust.nonzero().flatten()
            if len(targets) == 0:
                break
            started = time.perf_counter()
            with tqdm(total=len(targets), desc=f"{desc} {part}".strip(), unit="img", leave=False,
                      disable=not progress) as bar:
                for chunk in targets.split(batch_size):
                    adv = _run_part(adversary, part, x[chunk].clone(), y[chunk].clone())
                    fooled = model(adv).argmax(1) != y[chunk]
                    robust[chunk[fooled]] = False
                    x_adv[chunk[fooled]] = adv[fooled].detach()
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"robust {int(robust.sum())}/{len(x)}")
            accuracies[part] = robust.float().mean().item()
            if progress:
                log(f"eval: {desc + ' ' if desc else ''}{part}: robust {accuracies[part]:.4f} of {len(x)} images "
                    f"({time.perf_counter() - started:.0f} s)")
        checks.check_square_sr(accuracies, logger=logger)
    return x_adv.detach(), robust


def autoattack_accuracy(model, images: np.ndarray, labels: np.ndarray, *, name: str, eps: float,
                        device: torch.device, batch_size: int, seed: int, log: Callable[[str], None] = print,
                        desc: str = "", rank: int = 0, world_size: int = 1,
                        output_dtypes: set | None = None) -> float:
    """Accuracy under AutoAttack `name`, run over the whole set part by part (run_autoattack) rather than
    batch by batch, so each part's progress bar covers every image. Under torchrun each rank attacks its
    run of whole batches (as ml.evaluation.evaluate shards) and the correct counts are summed."""
    first, stop = distributed.shard_range(len(images), rank, world_size, block=batch_size)
    x = to_tensor_images(images[first:stop], device)
    y = torch.from_numpy(np.asarray(labels[first:stop], dtype=np.int64)).to(device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    if len(y):
        x_adv, _ = run_autoattack(model, x, y, name=name, eps=eps, seed=seed, batch_size=batch_size, log=log,
                                  progress=rank == 0, desc=desc)
        # Scored like every other attack: the returned images through the model, in fp32.
        with torch.no_grad():
            for i in range(0, len(y), batch_size):
                logits = model(x_adv[i:i + batch_size])
                correct += (logits.argmax(1) == y[i:i + batch_size]).sum()
                if output_dtypes is not None:
                    output_dtypes.add(logits.dtype)
    if world_size > 1:
        distributed.all_reduce_sum(correct)
    return correct.item() / max(1, len(images))


@contextlib.contextmanager
def _forward_warnings(logger: logging.Logger, log: Callable[[str], None], forwarded: set):
    """AutoAttack's warnings ("points with zero gradient", "randomized defense") are masking evidence:
    pass each distinct one to the stage log once instead of letting them scroll past on stderr."""
    class Forward(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message not in forwarded:
                forwarded.add(message)
                log(f"eval: autoattack: {message}")

    handler, propagate = Forward(logging.WARNING), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


class Scorer:
    """One model's accuracy under named attacks, memoised on (attack, eps, images): the sweep point or
    check that repeats a measurement gets the same number (same images, same seeded starts) for free."""

    def __init__(self, model, images: np.ndarray, labels: np.ndarray, *, device: torch.device,
                 batch_size: int = 256, seed: int = 0, log: Callable[[str], None] = print, desc: str = "",
                 rank: int = 0, world_size: int = 1):
        self.model, self.images, self.labels = model, images, labels
        self.device, self.batch_size, self.seed, self.log, self.desc = device, batch_size, seed, log, desc
        self.rank, self.world_size = rank, world_size  # under torchrun each rank attacks a shard of batches
        self.scores: dict[tuple[str, float, int], float] = {}
        self.output_dtypes: set[torch.dtype] = set()  # of the logits of every evaluation: fp32 is the promise

    def __call__(self, attack: str, eps: float, count: int | None = None) -> float:
        count = len(self.labels) if count is None else min(count, len(self.labels))
        eps = 0.0 if attack == "clean" else float(eps)
        key = (attack, round(eps, 9), count)
        if key not in self.scores and attack in AUTOATTACKS:
            self.scores[key] = autoattack_accuracy(
                self.model, self.images[:count], self.labels[:count], name=attack, eps=eps, device=self.device,
                batch_size=self.batch_size, seed=self.seed, log=self.log, desc=f"{self.desc} {attack}".strip(),
                rank=self.rank, world_size=self.world_size, output_dtypes=self.output_dtypes)
        if key not in self.scores:
            self.scores[key] = evaluate(
                self.model, self.images[:count], self.labels[:count], device=self.device,
                batch_size=self.batch_size, attack=build_attack(attack, eps, seed=self.seed, log=self.log),
                seed=self.seed, desc=f"{self.desc} {attack} eps={eps:.4g}".strip(), rank=self.rank,
                world_size=self.world_size, output_dtypes=self.output_dtypes)
        return self.scores[key]


def evaluate_model(score: Scorer, name: str, *, attacks, eps: float, sweep) -> list[dict]:
    """results.csv rows: each attack at eps (clean at 0), then PGD-20 at eps * m for m in the sweep."""
    n = len(score.labels)
    rows = [{"model": name, "split": "test", "attack": a, "eps": 0.0 if a == "clean" else eps,
             "accuracy": score(a, eps), "n": n} for a in attacks]
    for sweep_eps in [0.0] + sorted({eps * m for m in sweep if m > 0}):
        accuracy = score("clean", 0.0) if sweep_eps == 0 else score("pgd20", sweep_eps)
        rows.append({"model": name, "split": "test", "attack": SWEEP_ATTACK, "eps": sweep_eps,
                     "accuracy": accuracy, "n": n})
    return rows


# -- checks --------------------------------------------------------------------------------------------
def run_checks(score: Scorer, name: str, rows: list[dict], *, eps: float) -> list[dict]:
    """checks.csv rows for one model: each compares numbers that gradient masking or an evaluation bug
    would put in the wrong order. Extra attacks run on the first CHECK_IMAGES images only."""
    subset = min(len(score.labels), CHECK_IMAGES)
    fgsm_acc, pgd20, pgd100 = (score(a, eps, subset) for a in ("fgsm", "pgd20", "pgd100"))
    large = score("pgd20", LARGE_EPS, subset)
    sweep = [r for r in rows if r["attack"] == SWEEP_ATTACK]
    increases = [f"{a['eps']:.4g}->{b['eps']:.4g}: {a['accuracy']:.3f}->{b['accuracy']:.3f}"
                 for a, b in zip(sweep, sweep[1:]) if b["accuracy"] > a["accuracy"] + TOLERANCE]
    nonzero = _nonzero_gradient_fraction(score, subset)
    clean = score("clean", 0.0)
    stronger = [f"{r['attack']} {r['accuracy']:.3f}" for r in rows
                if r["attack"] not in ("clean", SWEEP_ATTACK) and r["accuracy"] > clean + TOLERANCE]
    dtypes = sorted(str(d).removeprefix("torch.") for d in score.output_dtypes)
    on = f"on {subset} images at eps {eps:.4g}"
    checks = [
        ("iterative_stronger_than_fgsm", pgd20 <= fgsm_acc + TOLERANCE,
         f"PGD-20 {pgd20:.3f} vs FGSM {fgsm_acc:.3f} {on}"),
        ("more_steps_not_weaker", pgd100 <= pgd20 + TOLERANCE, f"PGD-100 {pgd100:.3f} vs PGD-20 {pgd20:.3f} {on}"),
        ("eps_sweep_monotone", not increases,
         "accuracy rises with eps at " + "; ".join(increases) if increases else "non-increasing in eps"),
        ("large_eps_near_zero", large < LARGE_EPS_MAX_ACCURACY,
         f"PGD-20 {large:.3f} at eps {LARGE_EPS} on {subset} images (expected < {LARGE_EPS_MAX_ACCURACY})"),
        ("input_gradients_nonzero", nonzero >= MIN_NONZERO_GRADIENTS,
         f"{nonzero:.3f} of {subset} images have a non-zero input gradient (expected >= {MIN_NONZERO_GRADIENTS})"),
        ("robust_below_clean", not stronger,
         f"above clean {clean:.3f}: " + ", ".join(stronger) if stronger else f"all attacks <= clean {clean:.3f}"),
        # What the evaluations computed, not how the model looks now: a model scored under autocast (or
        # loaded in half precision) gives bf16/fp16 logits.
        ("evaluated_in_fp32", score.output_dtypes == {torch.float32},
         f"logits {', '.join(dtypes) or 'none'} in this model's evaluations"),
    ]
    return [{"model": name, "check": c, "passed": bool(ok), "detail": d} for c, ok, d in checks]


def _nonzero_gradient_fraction(score: Scorer, count: int) -> float:
    """A masked model (quantised input, shattered gradients) has an input gradient of exactly zero, which
    sign-gradient attacks read as "no direction to move" and report as robustness.

    Exactly zero, AutoAttack's own criterion, rather than "small": an honest model's cross-entropy
    gradient on an image it classifies with a margin of 30 logits is ~1e-13, and sign() still follows it.
    """
    nonzero = 0
    for start in range(0, count, score.batch_size):
        stop = min(start + score.batch_size, count)
        x = to_tensor_images(score.images[start:stop], score.device)
        y = torch.from_numpy(np.asarray(score.labels[start:stop], dtype=np.int64)).to(score.device)
        nonzero += int((input_gradient_norms(score.model, x, y) > 0).sum())
    return nonzero / max(1, count)


# -- plot ----------------------------------------------------------------------------------------------
def plot_robustness(path: Path, rows: list[dict], *, eps: float) -> None:
    """Accuracy vs eps per model (the PGD-20 sweep) with the headline attacks marked at eps; PNG, atomic."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry to leak

    frame = pd.DataFrame(rows)
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.add_subplot()
    markers = "osD^vP*Xh<>"
    headline = sorted(set(frame["attack"]) - {"clean", SWEEP_ATTACK})
    for i, (model, group) in enumerate(frame.groupby("model", sort=False)):
        color = f"C{i % 10}"
        curve = group[group["attack"] == SWEEP_ATTACK].sort_values("eps")
        axes.plot(curve["eps"], curve["accuracy"], "-", color=color, label=f"{model}: PGD-20")
        for marker, attack in zip(markers * 3, headline):
            point = group[group["attack"] == attack]
            if len(point):
                axes.plot(point["eps"], point["accuracy"], marker, color=color, linestyle="none",
                          label=f"{model}: {attack}")
    axes.axvline(eps, color="grey", linestyle=":", linewidth=1)
    axes.set(title=f"Robust accuracy vs L-inf radius (eval eps {eps:.4g}, n={int(frame['n'].max())})",
             xlabel="eps (L-inf, pixels in [0, 1])", ylabel="test accuracy", ylim=(-0.02, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def report_checks(checks: list[dict], log: Callable[[str], None]) -> None:
    for check in checks:
        if not check["passed"]:
            log(f"eval: WARNING check {check['check']} failed for {check['model']}: {check['detail']}")
    log(f"checks: {sum(c['passed'] for c in checks)}/{len(checks)} passed")

