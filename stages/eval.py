"""Stage 4, eval: the trained checkpoints under a suite of white-box attacks, an accuracy-vs-eps curve,
and sanity checks that flag gradient masking and evaluation bugs (the machinery is ml.robustness).

Writes results.csv (one accuracy per model, attack and eps), robustness.csv (the PGD-20 curve over
eval.sweep multiples of eps), robustness.png (that curve) and checks.csv.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from data.sources import LABELED
from pipeline.core.checks import Range, at_least
from pipeline.core.errors import UserError
from pipeline.core.fingerprint import file_digest
from pipeline.stage import Source, Stage, StageInput

OUTPUTS = ("results.csv", "robustness.csv", "checks.csv", "robustness.png")
MODEL_FILES = {"mart": ("mart", "model.pt"), "mart-last": ("mart", "last.pt"), "teacher": ("teacher", "model.pt")}

# The names the eval stage accepts (ml.robustness imports torch, so they are repeated here; a test keeps them
# equal).
EVAL_MODELS = tuple(MODEL_FILES)
EVAL_ATTACK = re.compile(r"clean|fgsm|autoattack|autoattack-fast|apgd-ce|apgd-dlr|apgd-t|fab|fab-t|square"
                         r"|(pgd|cw)[1-9][0-9]*")


@dataclass
class EvalConfig:
    # mart (selected), mart-last, teacher, or a checkpoint file (imported as mart.arch)
    models: list[str] = field(default_factory=lambda: ["mart"])
    # clean, fgsm, pgdN, cwN, autoattack, autoattack-fast or one AutoAttack part
    attacks: list[str] = field(default_factory=lambda: ["clean", "fgsm", "pgd20", "cw30", "autoattack"])
    n: int = 1000  # the first n test images, in dataset order
    eps: float = 0.0  # L-inf radius on [0, 1] pixels; 0 = the training radius mart.epsilon
    # multiples of eps for the PGD-20 curve
    sweep: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    batch_size: int = 256  # images per evaluation batch
    checks: bool = True  # run the gradient-masking sanity checks into checks.csv

    RANGES: ClassVar[dict] = {
        "n": at_least(0, "0 = the whole test set", high=2**40),
        "eps": Range(0, 1, meaning="the L-inf radius on [0, 1] pixels; 0 = the training radius mart.epsilon"),
        "batch_size": at_least(1, high=2**24),
    }

    def check(self, config, refuse, world_size: int) -> None:
        # Anything else is a checkpoint file to import (it must exist).
        unknown = [m for m in self.models if m not in EVAL_MODELS and not Path(m).is_file()]
        if unknown or not self.models:
            problem = f"{unknown[0]!r} is neither a model nor an existing file" if unknown else "it names no model"
            raise refuse("eval.models", f"{problem}; the models are {', '.join(EVAL_MODELS)} or checkpoint files",
                         "List some of them, e.g. --set eval.models=mart,teacher,/models/theirs.pt.")
        unknown = [a for a in self.attacks if not EVAL_ATTACK.fullmatch(a)]
        if unknown or not self.attacks:
            raise refuse("eval.attacks", (f"{unknown[0]!r} is not an attack" if unknown else "it names no attack")
                         + "; the forms are clean, fgsm, pgdN and cwN (N steps, e.g. pgd20, cw30), autoattack, "
                           "autoattack-fast (its apgd-ce and apgd-t only), or one AutoAttack part (apgd-ce, "
                           "apgd-dlr, apgd-t, fab, fab-t, square)",
                         "Fix the name, e.g. --set eval.attacks=clean,pgd20,autoattack.")
        bad = [m for m in self.sweep if not (math.isfinite(m) and m > 0)]
        if bad:
            raise refuse("eval.sweep", f"{bad[0]!r} is not a positive multiple of eps (the PGD-20 curve is "
                                       "measured at eps x each item)",
                         "Use numbers > 0, e.g. --set eval.sweep=0.5,1,2.")


def inputs(config) -> tuple:
    """The stages whose models eval.models names, and a source per checkpoint file it names (the file's
    digest is its fingerprint, so replacing the file re-evaluates it)."""
    stages = {MODEL_FILES[m][0] for m in config.eval.models if m in MODEL_FILES}
    files = [m for m in config.eval.models if m not in MODEL_FILES]
    return (LABELED, *sorted(stages), *(checkpoint_source(path) for path in files))


def checkpoint_source(path: str) -> Source:
    return Source(f"model {path}", lambda config: file_digest(path), lambda config, cache_dir: Path(path))


def model_path(inputs: dict[str, StageInput], name: str) -> Path:
    if name not in MODEL_FILES:
        raise UserError(f"unknown eval model {name!r} in eval.models; choose from {', '.join(MODEL_FILES)} "
                        f"(mart = the checkpoint selected on validation PGD accuracy, mart-last = the last epoch).")
    stage, filename = MODEL_FILES[name]
    return inputs[stage].path / filename


def run(ctx) -> None:
    """Under torchrun every rank runs this: each attacks its shard of the test batches (the accuracies
    are summed across ranks, so every rank sees the same numbers and takes the same path through the
    checks), and rank 0 writes the files."""
    import pandas as pd

    from ml import robustness
    from ml.devices import resolve_device
    from ml.evaluation import write_results
    from pipeline.core.atomic import atomic_write_csv
    cfg, run_cfg = ctx.config.eval, ctx.config.run
    # Always fp32 and eval mode, whatever run.precision: low-precision gradients underflow to zero and
    # make the attacks look weaker, overstating robustness (load_model gives fp32 in eval mode; no autocast).
    device = resolve_device(run_cfg.device, ctx.dist.local_rank)
    eps = cfg.eps or ctx.config.mart.epsilon
    labeled = ctx.sources["labeled"].dataset
    n = cfg.n if 0 < cfg.n <= len(labeled.test_labels) else len(labeled.test_labels)
    images, labels = labeled.test_images[:n], labeled.test_labels[:n]
    # Validate every name before minutes of attacks, so a typo fails at once.
    paths = {name: model_path(ctx.inputs, name) if name in MODEL_FILES else Path(name) for name in cfg.models}
    for attack in cfg.attacks:
        robustness.build_attack(attack, eps)

    results, checks = [], []
    for name, path in paths.items():
        model = load(name, path, ctx.config, labeled, device=device, channels_last=run_cfg.channels_last)
        score = robustness.Scorer(model, images, labels, device=device, batch_size=cfg.batch_size,
                                  seed=run_cfg.seed, log=ctx.log, desc=name, rank=ctx.dist.rank,
                                  world_size=ctx.dist.world_size)
        rows = robustness.evaluate_model(score, name, attacks=cfg.attacks, eps=eps, sweep=cfg.sweep)
        results += rows
        for row in rows:
            if row["attack"] != robustness.SWEEP_ATTACK:
                ctx.log(f"  {name} {row['attack']} eps={row['eps']:.4g}: {row['accuracy']:.4f}")
        if cfg.checks:
            checks += robustness.run_checks(score, name, rows, eps=eps)

    if not ctx.dist.is_main:
        return
    curve = [row for row in results if row["attack"] == robustness.SWEEP_ATTACK]
    write_results(ctx.out_dir / "results.csv", [row for row in results if row["attack"] != robustness.SWEEP_ATTACK])
    write_results(ctx.out_dir / "robustness.csv", curve)
    atomic_write_csv(ctx.out_dir / "checks.csv", pd.DataFrame(checks, columns=robustness.CHECK_COLUMNS))
    robustness.plot_robustness(ctx.out_dir / "robustness.png", results, eps=eps)
    if cfg.checks:
        robustness.report_checks(checks, ctx.log)


def load(name: str, path: Path, config, labeled, *, device, channels_last: bool):
    """One of our stages' checkpoints, or an imported file (ours, a state dict or a RobustBench/MART/RST
    checkpoint of mart.arch taking [0, 1] inputs or carrying its normalisation)."""
    import torch

    from ml.checkpoints import load_model

    if name in MODEL_FILES:
        return load_model(path, device=device, channels_last=channels_last)
    from ml.checkpoints import import_checkpoint

    model = import_checkpoint(path, arch=config.mart.arch, num_classes=labeled.num_classes,
                              in_channels=labeled.test_images.shape[-1]).to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def results(entry: Path) -> list[dict]:
    """Every model under every attack: sweep.csv's `eval.<model>.<attack>` (eval.mart.autoattack, ...)."""
    from stages.reporting import results_rows

    return results_rows(entry / "results.csv", lambda row: f"{row['model']}.{row['attack']}")


def report(entry: Path) -> str:
    from stages.reporting import csv_table, png

    return "\n".join(part for part in (csv_table(entry, "results.csv"), csv_table(entry, "checks.csv"),
                                        png(entry, "robustness.png", heading="robustness")) if part)


STAGE = Stage(
    name="eval", version=4, section="eval", config=EvalConfig, run=run, inputs=inputs, outputs=OUTPUTS,
    results=results, report=report,
    # mart.arch: the architecture a checkpoint file in eval.models is imported as; run.seed: the attacks'
    # random starts.
    reads=("mart.epsilon", "mart.arch", "run.seed", "run.device", "run.channels_last"),
    insignificant=("batch_size", "run.device", "run.channels_last"))
