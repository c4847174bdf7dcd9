"""Stage 4, eval: the trained checkpoints under a suite of white-box attacks, an accuracy-vs-eps curve,
and sanity checks that flag gradient masking and evaluation bugs (the machinery is ml.robustness).

Writes results.csv (one accuracy per model, attack and eps), robustness.csv (the PGD-20 curve over
eval.sweep multiples of eps), robustness.png (that curve) and checks.csv.
"""
from __future__ import annotations

from pathlib import Path

from data.sources import LABELED
from pipeline.core.errors import UserError
from pipeline.core.fingerprint import file_digest
from pipeline.stage import Source, Stage, StageInput

OUTPUTS = ("results.csv", "robustness.csv", "checks.csv", "robustness.png")
MODEL_FILES = {"mart": ("mart", "model.pt"), "mart-last": ("mart", "last.pt"), "teacher": ("teacher", "model.pt")}


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

    from pipeline.core.atomic import atomic_write_csv
    from ml import robustness
    from ml.devices import resolve_device
    from ml.evaluation import write_results
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

    from ml.models import load_model

    if name in MODEL_FILES:
        return load_model(path, device=device, channels_last=channels_last)
    from ml.checkpoints import import_checkpoint

    model = import_checkpoint(path, arch=config.mart.arch, num_classes=labeled.num_classes,
                              in_channels=labeled.test_images.shape[-1]).to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


STAGE = Stage(
    name="eval", version=4, section="eval", run=run, inputs=inputs, outputs=OUTPUTS,
    insignificant=("batch_size",), extra_params=("mart.epsilon",))
