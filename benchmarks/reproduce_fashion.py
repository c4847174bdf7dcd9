"""Does unlabeled data help adversarial training? MART's and RST's claims, on Fashion-MNIST, on a CPU.

    python -m benchmarks.reproduce_fashion [--quick] [--seeds 0 1] [--workdir runs/reproduce_fashion]
                                           [--out benchmarks/reproduce_fashion.csv]

What it measures: robust test accuracy at L-inf eps 0.1 of {pgd-at, trades, mart} (mart.loss) x
{labels only (mart.unsup_fraction 0), + pseudo-labeled pool (unsup_fraction 0.5)} x seeds (run.seed,
which also draws the class-balanced labeled subset), with 2,000 labels (200 per class) and the other
58,000 training images as the unlabeled pool, labels hidden (RST's setting, Carmon et al. 2019). Every
run trains on the same number of examples (mart.epochs x mart.epoch_size, set explicitly, so a
labels-only run makes more passes over its 2,000 labels and a pool run sees half labeled, half
pseudo-labeled examples per batch), then the eval stage attacks the first `eval.n` test images:
clean, PGD-20 and CW-30 on n = 500, and AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) on the
first 32 of them, in a second eval in its own work dir (AutoAttack costs ~3 s per image here, mostly
Square's 5,000 queries and FAB-T's 900 steps on small batches: on 500 images for 12 models it alone
would take hours). The claims tested: MART is more robust than TRADES and PGD-AT at the same budget
(Wang et al. 2020), and pseudo-labeled unlabeled data adds robust accuracy to each loss (Carmon et
al. 2019; MART + unlabeled data in Wang et al. 2020). AutoAttack close to PGD-20 says the PGD-20
numbers are not gradient masking; on 32 images one image is 3.1 points.

Everything else is configs/demo.toml (small-cnn, run.precision auto, channels_last, SGD lr 0.05
cosine, no augmentation in the adversarial stage, beta 6) except the training attack, PGD-3 with step
0.05 (the demo's PGD-2 is tuned for its clock; one more step here for the comparison), and a
10-epoch teacher. The teacher and
pseudolabel stages run once per seed and are copied (hard links) into each pool run's work dir, where
the runner finds them fresh; labels-only runs need neither. Everything is cached: a rerun with the
same settings reprints the table in seconds, and a killed run resumes.

Budget (default): mart.epochs 8 x mart.epoch_size 3072 = 24,576 training examples per run (12 passes
over the 2,000 labels for a labels-only run; 6 passes plus 12,288 pool draws for a pool run), 12 runs;
eval.sweep and eval.checks off (they would add a 6-point PGD-20 sweep and PGD-100 per model).
`--quick`: 500 labels, a 2,000-image pool, tiny-cnn, one epoch of 256 examples with PGD-3, clean and
PGD-20 on 64 images, one seed: a smoke test of this script (~15 s), numbers meaningless.

Runtime (default): 39 min 46 s on 2026-11-25 on an idle 2-core AMD EPYC (AVX2, so fp32; torch 2.14.1,
2 threads): per run ~80 s of MART training (8 x 3,072 examples), ~15 s of clean + PGD-20 + CW-30 on 500
images and ~75 s of AutoAttack on 32, x 12, plus ~1 minute of teacher and pseudo-labels per seed.
With other jobs on the cores everything is 2-5x slower (AutoAttack's many small batches suffer most).

Results last seen: the README's table ("Reproducing the papers' claims"), rows in
benchmarks/reproduce_fashion.csv; `--quick` gives 6 rows in ~15 s.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from data.sources import open_sources
from pipeline.config import CONFIG_DIR, load_config
from pipeline.runner import Runner, results_table

BASE_CONFIG = CONFIG_DIR / "demo.toml"
LOSSES = ("pgd-at", "trades", "mart")
DATA_SETTINGS = {"labels only": 0.0, "+ pseudo-labeled pool": 0.5}  # -> mart.unsup_fraction
SHARED_STAGES = ("teacher", "pseudolabel")  # depend on data, seed and teacher keys only: one copy per seed


@dataclass(frozen=True)
class Budget:
    """Everything that sizes the benchmark; the rest comes from configs/demo.toml."""

    num_labeled: int  # labeled training images (class-balanced, drawn with run.seed)
    pool_limit: int  # first N pool images; 0 = all 60,000 - num_labeled
    arch: str  # teacher and MART model
    teacher_epochs: int  # passes over the labeled set
    epochs: int  # MART epochs
    epoch_size: int  # examples per MART epoch, the same for every loss and data setting
    batch_size: int  # images per MART step
    steps: int  # PGD steps of the training attack
    step_size: float  # PGD step of the training attack, on [0, 1] pixels
    eval_n: int  # first n test images for `attacks`
    attacks: tuple[str, ...]  # eval attacks on eval_n images
    autoattack_n: int  # first n test images for AutoAttack (a second eval); 0 = no AutoAttack
    mart_eval_n: int  # test images for the mart stage's own clean/PGD-20 report (a sanity check, not the table)
    seeds: tuple[int, ...]  # run.seed values

    def overrides(self) -> list[str]:
        """`section.key=value` overrides of demo.toml shared by every run."""
        return [
            f"data.num_labeled={self.num_labeled}",
            f"pool.limit={self.pool_limit}",
            f'teacher.arch="{self.arch}"',
            f"teacher.epochs={self.teacher_epochs}",
            f'mart.arch="{self.arch}"',
            f"mart.epochs={self.epochs}",
            f"mart.epoch_size={self.epoch_size}",
            f"mart.batch_size={self.batch_size}",
            f"mart.steps={self.steps}",
            f"mart.step_size={self.step_size}",
            f"mart.eval_n={self.mart_eval_n}",
            "eval.sweep=[]",  # no accuracy-vs-eps curve: one PGD-20 per model is the headline
            "eval.checks=false",  # the masking checks add PGD-100 and more per model
            'eval.models=["mart"]',
        ]


DEFAULT = Budget(num_labeled=2000, pool_limit=0, arch="small-cnn", teacher_epochs=10, epochs=8, epoch_size=3072,
                 batch_size=128, steps=3, step_size=0.05, eval_n=500, attacks=("clean", "pgd20", "cw30"),
                 autoattack_n=32, mart_eval_n=100, seeds=(0, 1))
QUICK = Budget(num_labeled=500, pool_limit=2000, arch="tiny-cnn", teacher_epochs=1, epochs=1, epoch_size=256,
               batch_size=64, steps=3, step_size=0.04, eval_n=64, attacks=("clean", "pgd20"), autoattack_n=0,
               mart_eval_n=16, seeds=(0,))


# -- work dirs ---------------------------------------------------------------------------------------
def _link_or_copy(src: str, dst: str) -> str:
    """Hard links: stages replace files atomically and never write in place, so sharing inodes is safe."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def copy_stages(src: Path, dst: Path, stages) -> None:
    """Put `src`'s finished stage directories into `dst`, replacing any whose stage.json differs."""
    for stage in stages:
        record = src / stage / "stage.json"
        if not record.exists():
            raise RuntimeError(f"{src / stage} has no stage.json; run that stage there first")
        target = dst / stage
        if (target / "stage.json").exists() and (target / "stage.json").read_bytes() == record.read_bytes():
            continue
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(src / stage, target, copy_function=_link_or_copy)


def _stage_record(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / stage / "stage.json").read_text())


def _accuracies(workdir: Path) -> dict[str, tuple[float, int]]:
    """attack -> (accuracy in percent, n) from an eval stage's results.csv."""
    table = results_table(workdir, ["eval"])
    table = table[(table["model"] == "mart") & (table["split"] == "test")]
    return {row.attack: (100.0 * row.accuracy, int(row.n)) for row in table.itertuples()}


# -- the runs ------------------------------------------------------------------------------------------
def run_one(budget: Budget, workdir: Path, *, seed: int, loss: str, unsup_fraction: float, data,
            log: Callable[[str], None]) -> dict:
    """Train and evaluate one (seed, loss, data setting); returns its raw row (accuracies in percent)."""
    overrides = budget.overrides() + [f"run.seed={seed}", f'mart.loss="{loss}"',
                                      f"mart.unsup_fraction={unsup_fraction}"]
    seed_dir = workdir / f"seed{seed}"
    run_dir = seed_dir / f"{loss}-{'pool' if unsup_fraction > 0 else 'labels'}"
    if unsup_fraction > 0:
        copy_stages(seed_dir / "shared", run_dir, SHARED_STAGES)
    config = load_config(BASE_CONFIG, overrides + [f"eval.attacks={','.join(budget.attacks)}",
                                                   f"eval.n={budget.eval_n}"])
    Runner(config, run_dir, log=log, data=data).run(["mart", "eval"])
    accuracies = _accuracies(run_dir)
    mart_record, eval_record = _stage_record(run_dir, "mart"), _stage_record(run_dir, "eval")
    row = {"seed": seed, "loss": loss, "unsup_fraction": unsup_fraction,
           "epochs": mart_record["params"]["mart"]["epochs"],
           "epoch_size": mart_record["params"]["mart"]["epoch_size"],
           "mart_seconds": mart_record["seconds"], "eval_seconds": eval_record["seconds"]}
    row.update({attack: accuracies[attack][0] for attack in budget.attacks})
    row["n"] = accuracies[budget.attacks[0]][1]

    if budget.autoattack_n:
        # Its own work dir (the upstream stages hard-linked in), so both evals stay cached side by side.
        aa_dir = run_dir.with_name(run_dir.name + "-autoattack")
        copy_stages(run_dir, aa_dir, Runner(config, run_dir).closure(["mart"]))
        aa_config = load_config(BASE_CONFIG, overrides + ['eval.attacks=["autoattack"]',
                                                          f"eval.n={budget.autoattack_n}"])
        Runner(aa_config, aa_dir, log=log, data=data).run(["eval"])
        row["autoattack"], row["n_autoattack"] = _accuracies(aa_dir)["autoattack"]
        row["eval_seconds"] += _stage_record(aa_dir, "eval")["seconds"]
    return row


def run(budget: Budget = DEFAULT, workdir: Path | str = "runs/reproduce_fashion", *, seeds=None,
        log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All runs (cached where done); returns (summary table, raw per-seed rows)."""
    workdir = Path(workdir)
    rows = []
    for seed in seeds if seeds is not None else budget.seeds:
        # The teacher and its pseudo-labels, once per seed; each pool run gets a copy. The data sources
        # (labeled set, split, pool) depend only on the data and pool sections and the seed: opened once.
        shared = load_config(BASE_CONFIG, budget.overrides() + [f"run.seed={seed}"])
        data = open_sources(shared, need_pool=False)
        Runner(shared, workdir / f"seed{seed}" / "shared", log=_tagged(log, f"seed {seed}"), data=data).run(
            list(SHARED_STAGES))
        for loss in LOSSES:
            for setting, unsup_fraction in DATA_SETTINGS.items():
                tag = f"seed {seed} {loss} {setting}"
                start = time.perf_counter()
                row = run_one(budget, workdir, seed=seed, loss=loss, unsup_fraction=unsup_fraction, data=data,
                              log=_tagged(log, tag))
                log(f"[{tag}] done in {time.perf_counter() - start:.0f}s: "
                    + ", ".join(f"{a} {row[a]:.1f}" for a in (*budget.attacks, "autoattack") if a in row))
                rows.append({"data": setting, **row})
    raw = pd.DataFrame(rows)
    return summarize(raw, budget), raw


def _tagged(log: Callable[[str], None], tag: str) -> Callable[[str], None]:
    return lambda message: log(f"[{tag}] {message}")


# -- the table -------------------------------------------------------------------------------------------
def attack_columns(budget: Budget) -> list[str]:
    return list(budget.attacks) + (["autoattack"] if budget.autoattack_n else [])


def summarize(raw: pd.DataFrame, budget: Budget) -> pd.DataFrame:
    """One row per (loss, data): each attack's accuracy as "mean ± std" over seeds (percent)."""
    rows = []
    for (loss, data), group in raw.groupby(["loss", "data"], sort=False):
        row = {"loss": loss, "data": data}
        for attack in attack_columns(budget):
            mean, std = group[attack].mean(), group[attack].std()  # std with ddof 1: NaN for one seed
            row[attack] = f"{mean:.1f} ± {std:.1f}" if len(group) > 1 else f"{mean:.1f}"
        row["n"] = int(group["n"].iloc[0])
        if budget.autoattack_n:
            row["n_autoattack"] = int(group["n_autoattack"].iloc[0])
        row["seeds"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows)


def pool_gains(raw: pd.DataFrame, attack: str = "pgd20") -> dict[str, float]:
    """Per loss: mean accuracy with the pool minus mean accuracy with labels only (percentage points)."""
    means = raw.groupby(["loss", "unsup_fraction"])[attack].mean()
    return {loss: means[loss].iloc[-1] - means[loss].iloc[0] for loss in LOSSES if loss in means.index}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test (< 1 minute)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run.seed values (default: 0 1; --quick: 0)")
    parser.add_argument("--workdir", help="work dirs root (default runs/reproduce_fashion[_quick])")
    parser.add_argument("--out", help="CSV of the per-seed rows (default benchmarks/reproduce_fashion.csv; "
                                      "--quick: <workdir>/reproduce_fashion.csv)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else DEFAULT
    workdir = Path(args.workdir or ("runs/reproduce_fashion_quick" if args.quick else "runs/reproduce_fashion"))
    out = Path(args.out or (workdir / "reproduce_fashion.csv" if args.quick else "benchmarks/reproduce_fashion.csv"))

    print(f"machine: {machine()}")
    print(f"budget: {budget}", flush=True)
    start = time.perf_counter()
    table, raw = run(budget, workdir, seeds=args.seeds)
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    raw.assign(num_labeled=budget.num_labeled, arch=budget.arch,
               eps=load_config(BASE_CONFIG).mart.epsilon).to_csv(out, index=False)

    autoattack = " (AutoAttack on the first n_autoattack)" if budget.autoattack_n else ""
    print(f"\nFashion-MNIST, {budget.num_labeled} labels, L-inf eps 0.1, {budget.arch}, "
          f"{budget.epochs} x {budget.epoch_size} training examples per run; test accuracy (%) on the first "
          f"n test images{autoattack}, mean ± std over seeds:")
    print(table.to_string(index=False))
    for loss, gain in pool_gains(raw).items():
        print(f"unlabeled data helps {loss}: {gain:+.1f} PGD-20 points")
    print(f"total {seconds / 60:.1f} min (cached stages included as 0); rows written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
