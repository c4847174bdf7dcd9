"""Does unlabeled data help adversarial training? MART's and RST's claims, on Fashion-MNIST, on a CPU.

    python -m benchmarks.reproduce_fashion [--quick] [--seeds 0 1 2] [--workdir runs/reproduce_fashion]
                                           [--out benchmarks/reproduce_fashion.csv]

What it measures: robust test accuracy at L-inf eps 0.1 of {pgd-at, trades, mart} (mart.loss) x
{labels only (mart.unsup_fraction 0), + pseudo-labeled pool (unsup_fraction 0.5)} x seeds (run.seed,
which also draws the class-balanced labeled subset), with 2,000 labels (200 per class) and the other
58,000 training images as the unlabeled pool, labels hidden (RST's setting, Carmon et al. 2019). Every
run trains on the same number of examples (mart.epochs x mart.epoch_size, set explicitly, so a
labels-only run makes more passes over its 2,000 labels and a pool run sees half labeled, half
pseudo-labeled examples per batch). The claims tested: MART is more robust than TRADES and PGD-AT at
the same budget (Wang et al. 2020), and pseudo-labeled unlabeled data adds robust accuracy to each loss
(Carmon et al. 2019; MART + unlabeled data in Wang et al. 2020).

How: two `pipeline.sweep_grid` grids over configs/demo.toml plus the Budget's overrides, sharing one stage
store (`<workdir>/.store`, or $RST_MART_STORE), so every stage whose fingerprint agrees is built once:
the teacher and its pseudo-labels once per seed (labels-only runs need neither), each MART model once.
1. `<workdir>/attacks/`: stages mart and eval, clean, PGD-20 and CW-30 on all 10,000 test images.
2. `<workdir>/autoattack/`: the same variants with eval.attacks = [autoattack-fast] (the standard
   suite's APGD-CE then APGD-T, the AutoAttack authors' reduced version) on the first 1,000 test images;
   its MART models come from the store, so only eval runs. The standard suite's FAB-T and Square would
   add as much again per model (README, "Evaluation"). AutoAttack close to PGD-20 says the PGD-20
   numbers are not gradient masking.
The table is read from each variant's eval/results.csv. A rerun with the same settings reprints the
table in seconds (every stage cached); a killed run resumes.

Everything else is configs/demo.toml (small-cnn, run.precision auto, channels_last, SGD lr 0.05 cosine,
no augmentation in the adversarial stage, beta 6) except the training attack, PGD-3 with step 0.05 (the
demo's PGD-2 is tuned for its clock; one more step here for the comparison), and a 10-epoch teacher.

Budget (default): mart.epochs 8 x mart.epoch_size 3072 = 24,576 training examples per run (12 passes
over the 2,000 labels for a labels-only run; 6 passes plus 12,288 pool draws for a pool run), 18 runs
(3 seeds);
eval.sweep and eval.checks off (they would add a 6-point PGD-20 sweep and PGD-100 per model).
`--quick`: 500 labels, a 2,000-image pool, tiny-cnn, one epoch of 256 examples with PGD-3, clean and
PGD-20 on 64 images, autoattack-fast on 4, one seed: a smoke test of this script (under a minute on an idle
2-core CPU), numbers meaningless.

Runtime (default), 2-core Xeon with AMX (bf16 training, fp32 evaluation): per model ~20-50 s of MART
training, ~3.5 minutes of clean + PGD-20 + CW-30 on 10,000 images and ~4 minutes of autoattack-fast on
1,000 (2 threads, nothing else running; the README times AutoAttack's parts), x 18, plus ~20 s of teacher
and pseudo-labels per seed: about 2.5 hours, more than one working session, so it is cached and resumes.

Accuracy: the README's table, "Reproducing the papers' claims" (per-model rows in
benchmarks/reproduce_fashion.csv).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import CONFIG_DIR, load_config
from pipeline.core.atomic import atomic_write_csv
from pipeline.core.errors import UserError
from pipeline.sweep_grid import SEED_KEY, run_sweep

BASE_CONFIG = CONFIG_DIR / "demo.toml"
LOSSES = ("pgd-at", "trades", "mart")
DATA_SETTINGS = {"labels only": 0.0, "+ pseudo-labeled pool": 0.5}  # -> mart.unsup_fraction
# MART's runs first (the claim under test), so a run stopped part way (it resumes) has measured those.
GRID = [f"mart.loss={','.join(reversed(LOSSES))}", f"mart.unsup_fraction={','.join(map(str, DATA_SETTINGS.values()))}"]
ATTACKS_SWEEP, AUTOATTACK_SWEEP = "attacks", "autoattack"  # sweep dirs under the work dir, one store beside them


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
    autoattack: str  # the AutoAttack variant of the second sweep (eval.attacks name; also its column)
    autoattack_n: int  # first n test images for it; 0 = no AutoAttack sweep
    mart_eval_n: int  # test images for the mart stage's own clean/PGD-20 report (a sanity check, not the table)
    seeds: tuple[int, ...]  # run.seed values

    def overrides(self) -> list[str]:
        """`section.key=value` overrides of demo.toml shared by every run (one value each: not swept)."""
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
                 batch_size=128, steps=3, step_size=0.05, eval_n=10_000, attacks=("clean", "pgd20", "cw30"),
                 autoattack="autoattack-fast", autoattack_n=1000, mart_eval_n=100, seeds=(0, 1, 2))
QUICK = Budget(num_labeled=500, pool_limit=2000, arch="tiny-cnn", teacher_epochs=1, epochs=1, epoch_size=256,
               batch_size=64, steps=3, step_size=0.04, eval_n=64, attacks=("clean", "pgd20"),
               autoattack="autoattack-fast", autoattack_n=4,
               mart_eval_n=16, seeds=(0,))


# -- the sweeps ------------------------------------------------------------------------------------------
def _toml_list(names) -> str:
    """A TOML list, so the sweep's comma splitting leaves it one value."""
    return "[" + ",".join(f'"{name}"' for name in names) + "]"


def run(budget: Budget = DEFAULT, workdir: Path | str = "runs/reproduce_fashion", *, seeds=None,
        log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Both sweeps (cached where done); returns (summary table, raw per-seed rows)."""
    workdir = Path(workdir)
    seed_list = ",".join(str(s) for s in (budget.seeds if seeds is None else seeds))
    common = budget.overrides() + GRID
    sweep_csv = run_sweep(BASE_CONFIG, common + [f"eval.attacks={_toml_list(budget.attacks)}",
                                                 f"eval.n={budget.eval_n}"],
                          ["mart", "eval"], workdir / ATTACKS_SWEEP, seeds=seed_list, log=log)
    raw = variant_rows(sweep_csv, budget.attacks)
    if budget.autoattack_n:
        sweep_csv = run_sweep(BASE_CONFIG, common + [f"eval.attacks={_toml_list([budget.autoattack])}",
                                                     f"eval.n={budget.autoattack_n}"],
                              ["eval"], workdir / AUTOATTACK_SWEEP, seeds=seed_list, log=log)
        autoattack = variant_rows(sweep_csv, [budget.autoattack])
        keys = ["seed", "loss", "unsup_fraction"]
        autoattack = autoattack[keys + [budget.autoattack, "n", "eval_seconds"]].rename(
            columns={"n": "n_autoattack", "eval_seconds": "autoattack_seconds"})
        raw = raw.merge(autoattack, on=keys, how="left", validate="one_to_one")
        raw["eval_seconds"] += raw.pop("autoattack_seconds")
        raw = raw[[c for c in raw.columns if c != "n_autoattack"] + ["n_autoattack"]]
    return summarize(raw, budget), raw


def variant_rows(sweep_csv: Path, attacks) -> pd.DataFrame:
    """One row per variant of a sweep: its settings, stage seconds and the eval accuracies (percent)."""
    sweep = pd.read_csv(sweep_csv)
    settings = {fraction: name for name, fraction in DATA_SETTINGS.items()}
    rows = []
    for row in sweep.to_dict("records"):
        workdir = sweep_csv.parent / row["variant"]
        mart, evaluation = _stage_record(workdir, "mart"), _stage_record(workdir, "eval")
        results = pd.read_csv(workdir / "eval" / "results.csv")
        results = results[(results["model"] == "mart") & (results["split"] == "test")].set_index("attack")
        rows.append({"data": settings[float(row["mart.unsup_fraction"])], "seed": int(row[SEED_KEY]),
                     "loss": row["mart.loss"], "unsup_fraction": float(row["mart.unsup_fraction"]),
                     "epochs": mart["params"]["mart"]["epochs"], "epoch_size": mart["params"]["mart"]["epoch_size"],
                     "mart_seconds": mart["seconds"], "eval_seconds": evaluation["seconds"],
                     **{attack: 100.0 * float(results.loc[attack, "accuracy"]) for attack in attacks},
                     "n": int(results.loc[attacks[0], "n"])})
    frame = pd.DataFrame(rows)
    # The table's order: seed, then loss, then data setting, as LOSSES and DATA_SETTINGS list them.
    order = frame.assign(_loss=frame["loss"].map(LOSSES.index),
                         _data=frame["data"].map(list(DATA_SETTINGS).index))
    return frame.loc[order.sort_values(["seed", "_loss", "_data"]).index].reset_index(drop=True)


def _stage_record(workdir: Path, stage: str) -> dict:
    return json.loads((workdir / stage / "stage.json").read_text())


# -- the table -------------------------------------------------------------------------------------------
def attack_columns(budget: Budget) -> list[str]:
    return list(budget.attacks) + ([budget.autoattack] if budget.autoattack_n else [])


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
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test (~1 minute)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run.seed values (default: 0 1 2; --quick: 0)")
    parser.add_argument("--workdir", help="sweeps and their store (default runs/reproduce_fashion[_quick])")
    parser.add_argument("--out", help="CSV of the per-seed rows (default benchmarks/reproduce_fashion.csv; "
                                      "--quick: <workdir>/reproduce_fashion.csv)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else DEFAULT
    workdir = Path(args.workdir or ("runs/reproduce_fashion_quick" if args.quick else "runs/reproduce_fashion"))
    out = Path(args.out or (workdir / "reproduce_fashion.csv" if args.quick else "benchmarks/reproduce_fashion.csv"))

    print(f"machine: {machine()}")
    print(f"budget: {budget}", flush=True)
    start = time.perf_counter()
    try:
        table, raw = run(budget, workdir, seeds=args.seeds)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out, raw.assign(num_labeled=budget.num_labeled, arch=budget.arch,
                                     eps=load_config(BASE_CONFIG).mart.epsilon))

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
