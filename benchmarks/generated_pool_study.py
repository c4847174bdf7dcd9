"""Does a generated pool help MART as the real unlabeled pool does? Fashion-MNIST, on a CPU, as a curve in budget.

    python -m benchmarks.generated_pool_study [--quick] [--seeds 0 1 2] [--epochs 4 16 32 64 128]
                                              [--settings labels generated real]
                                              [--workdir runs/generated_pool_study]
                                              [--out benchmarks/generated_pool_study.csv]

What it measures: clean and PGD-20 (L-inf eps 0.1) accuracy on all 10,000 test images of MART models
trained with
- labels only: the 6,000 labeled images (mart.unsup_fraction 0);
- generated pool: half of each batch from the demo's generated pool (configs/demo_generated.toml: 12,000
  images sampled from the shipped generator, trained on the same 6,000 labeled images only), labelled
  by the teacher;
- real pool: half of each batch from the other 54,000 Fashion-MNIST training images, labels hidden,
  labelled by the teacher (RST's setting),
at equal training budgets (mart.epochs x mart.epoch_size examples, the same for every setting), for
each budget in --epochs and each seed (run.seed draws the labeled subset, the teacher, the generated
images and MART's initialisation). Beside each model: the teacher's accuracy on the real test images,
and its agreement with the pool's own labels (for the generated pool, the class each image was
generated for; for the real pool, the hidden true labels): how far a teacher's pseudo-labels can be
trusted on generated images, against real ones.

How: one `pipeline.sweep_grid` sweep per (setting, budget) over configs/demo_generated.toml, all
sharing one stage store (`<workdir>/.store`, or $RST_MART_STORE), so the teacher, the generator and each
seed's pools are built once. The smaller budgets run first, for every setting and seed, so a run
stopped part way (it resumes; every stage is cached) has whole rows of the curve. --settings, --seeds and
--epochs pick a part of the grid; runs of parts side by side (one thread each) can share the store.
Evaluation is the eval stage with eval.attacks [clean, pgd20] on eval.n test images (eval.sweep and
eval.checks off).

Budget (default): mart.epochs 4, 16, 32, 64 and 128 x 6,144 examples (4 to 128 passes' worth of the
6,000 labels; labels only stops improving after 64), 45 models, everything else as
configs/demo_generated.toml (small-cnn, PGD-2 training attack, beta 2, SGD 0.05 cosine, training
precision auto). `--quick`: 500 labels, tiny-cnn, 256 generated
images, budgets of 1 and 2 epochs of 128 examples, 64 test images, one seed: a smoke test of this script
(under a minute), numbers meaningless.

Results and the machine they were measured on: docs/benchmarks/generated-pools.md (rows in
benchmarks/generated_pool_study.csv, curves in generated_pool_study.png beside it).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from benchmarks.reproduce_fashion import _stage_record, machine
from pipeline.config import CONFIG_DIR
from pipeline.core.atomic import atomic_path, atomic_write_csv
from pipeline.core.errors import UserError
from pipeline.sweep_grid import SEED_KEY, run_sweep

BASE_CONFIG = CONFIG_DIR / "demo_generated.toml"
# setting -> (pool.provider, mart.unsup_fraction, its sweep dirs' name)
SETTINGS = {
    "labels only": ("labeled-remainder", 0.0, "labels"),
    "generated pool": ("generate", 0.5, "generated"),
    "real pool": ("labeled-remainder", 0.5, "real"),
}
ATTACKS = ("clean", "pgd20")


@dataclass(frozen=True)
class Budget:
    """Everything that sizes the study; the rest comes from configs/demo_generated.toml."""

    num_labeled: int
    generated: int  # generate.n
    pool_limit: int  # first N real pool images; 0 = all 60,000 - num_labeled
    arch: str
    teacher_epochs: int
    epochs: tuple[int, ...]  # the budgets: mart.epochs values, smallest first
    epoch_size: int
    batch_size: int
    eval_n: int
    seeds: tuple[int, ...]
    settings: tuple[str, ...] = tuple(SETTINGS)

    def overrides(self) -> list[str]:
        return [
            f"data.num_labeled={self.num_labeled}",
            f"generate.n={self.generated}",
            f"generate.shard_size={min(self.generated, 2000)}",
            f'teacher.arch="{self.arch}"',
            f"teacher.epochs={self.teacher_epochs}",
            f'mart.arch="{self.arch}"',
            f"mart.epoch_size={self.epoch_size}",
            f"mart.batch_size={self.batch_size}",
            "mart.eval_n=100",  # the mart stage's own check; the table is the eval stage's
            f"eval.n={self.eval_n}",
            "eval.attacks=[" + ",".join(f'"{a}"' for a in ATTACKS) + "]",
            "eval.sweep=[]",
            "eval.checks=false",
            'eval.models=["mart"]',
        ]

    def setting_overrides(self, setting: str) -> list[str]:
        provider, unsup_fraction, _ = SETTINGS[setting]
        limit = [f"pool.limit={self.pool_limit}"] if provider == "labeled-remainder" else []
        return [f'pool.provider="{provider}"', f"mart.unsup_fraction={unsup_fraction}", *limit]


DEFAULT = Budget(num_labeled=6000, generated=12_000, pool_limit=0, arch="small-cnn", teacher_epochs=10,
                 epochs=(4, 16, 32, 64, 128), epoch_size=6144, batch_size=128, eval_n=10_000, seeds=(0, 1, 2))
QUICK = Budget(num_labeled=500, generated=256, pool_limit=2000, arch="tiny-cnn", teacher_epochs=1, epochs=(1, 2),
               epoch_size=128, batch_size=64, eval_n=64, seeds=(0,))


def run(budget: Budget = DEFAULT, workdir: Path | str = "runs/generated_pool_study", *,
        log: Callable[[str], None] = print) -> pd.DataFrame:
    """Every (budget, setting) sweep, smallest budget first (cached where done); one row per model."""
    workdir = Path(workdir)
    seeds = ",".join(map(str, budget.seeds))
    rows = []
    for epochs in budget.epochs:
        for setting in budget.settings:
            sweep_dir = workdir / f"{SETTINGS[setting][2]}-e{epochs}"
            overrides = budget.overrides() + budget.setting_overrides(setting) + [f"mart.epochs={epochs}"]
            sweep_csv = run_sweep(BASE_CONFIG, overrides, ["mart", "eval"], sweep_dir, seeds=seeds, log=log)
            rows += model_rows(sweep_csv, setting)
    return pd.DataFrame(rows)


def model_rows(sweep_csv: Path, setting: str) -> list[dict]:
    rows = []
    for variant in pd.read_csv(sweep_csv).to_dict("records"):
        workdir = sweep_csv.parent / variant["variant"]
        mart = _stage_record(workdir, "mart")
        results = _results(workdir / "eval", "mart")
        teacher = _results(workdir / "teacher", "teacher") if (workdir / "teacher").exists() else None
        row = {"setting": setting, "seed": int(variant[SEED_KEY]), "epochs": mart["params"]["mart"]["epochs"],
               "examples": mart["params"]["mart"]["epochs"] * mart["params"]["mart"]["epoch_size"],
               **{attack: 100.0 * results.loc[attack, "accuracy"] for attack in ATTACKS},
               "n": int(results.loc[ATTACKS[0], "n"]), "mart_seconds": mart["seconds"],
               "teacher_clean": 100.0 * teacher.loc["clean", "accuracy"] if teacher is not None else None}
        quality = workdir / "pseudolabel" / "quality.csv"
        if setting != "labels only" and quality.exists():
            total = pd.read_csv(quality).set_index("class").loc["all"]
            row["pool_agreement"] = 100.0 * total["precision"]  # teacher vs the pool's own labels
            row["pool_images"] = int(total["count"])
        rows.append(row)
    return rows


def _results(stage_dir: Path, model: str) -> pd.DataFrame:
    results = pd.read_csv(stage_dir / "results.csv")
    return results[(results["model"] == model) & (results["split"] == "test")].set_index("attack")


def summarize(raw: pd.DataFrame) -> pd.DataFrame:
    """One row per (budget, setting): clean and PGD-20 as "mean ± std" over seeds (percent)."""
    rows = []
    for (examples, setting), group in raw.groupby(["examples", "setting"], sort=False):
        row = {"examples": examples, "setting": setting}
        for attack in ATTACKS:
            mean, std = group[attack].mean(), group[attack].std()
            row[attack] = f"{mean:.1f} ± {std:.1f}" if len(group) > 1 else f"{mean:.1f}"
        row["seeds"] = len(group)
        rows.append(row)
    return pd.DataFrame(rows)


def labeling_table(raw: pd.DataFrame) -> pd.DataFrame:
    """Per seed: the teacher's accuracy on real test images and its agreement with each pool's labels."""
    pools = raw.dropna(subset=["pool_agreement"]).drop_duplicates(["setting", "seed"])
    table = pools.pivot(index="seed", columns="setting", values="pool_agreement")
    table.columns = [f"agreement on {name} (%)" for name in table.columns]
    teacher = raw.dropna(subset=["teacher_clean"]).drop_duplicates("seed").set_index("seed")["teacher_clean"]
    return table.join(teacher.rename("teacher on real test (%)")).reset_index()


def plot(raw: pd.DataFrame, path: Path) -> None:
    """Clean and PGD-20 against training examples, one line per setting (mean over seeds, std as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ATTACKS), figsize=(10, 4))
    for ax, attack in zip(axes, ATTACKS):
        for setting in SETTINGS:
            curve = raw[raw["setting"] == setting].groupby("examples")[attack]
            if len(curve):
                ax.errorbar(curve.mean().index, curve.mean(), yerr=curve.std().fillna(0), marker="o", capsize=3,
                            label=setting)
        ax.set_xscale("log")
        budgets = sorted(raw["examples"].unique())  # the budgets as ticks: log-axis minor labels overlap
        ax.set_xticks(budgets, [f"{b / 1000:.0f}K" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training examples")
        ax.set_ylabel(f"{'PGD-20' if attack == 'pgd20' else attack} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed: a smoke test (~1 minute)")
    parser.add_argument("--seeds", type=int, nargs="+", help="run.seed values (default: 0 1 2; --quick: 0)")
    parser.add_argument("--epochs", type=int, nargs="+", help="the budgets, as mart.epochs (default 4 16 32 64 128)")
    slugs = {slug: setting for setting, (_, _, slug) in SETTINGS.items()}
    parser.add_argument("--settings", nargs="+", choices=list(slugs), help="data settings (default: all three)")
    parser.add_argument("--workdir", help="sweeps and their store (default runs/generated_pool_study[_quick])")
    parser.add_argument("--out", help="CSV of the per-model rows (default benchmarks/generated_pool_study.csv; "
                                      "--quick: <workdir>/generated_pool_study.csv)")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else DEFAULT
    budget = replace(budget, seeds=tuple(args.seeds or budget.seeds),
                     epochs=tuple(sorted(args.epochs or budget.epochs)),
                     settings=tuple(slugs[s] for s in args.settings) if args.settings else budget.settings)
    name = "generated_pool_study"
    workdir = Path(args.workdir or (f"runs/{name}_quick" if args.quick else f"runs/{name}"))
    out = Path(args.out or (workdir / f"{name}.csv" if args.quick else f"benchmarks/{name}.csv"))

    print(f"machine: {machine()}")
    print(f"budget: {budget}", flush=True)
    start = time.perf_counter()
    try:
        raw = run(budget, workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out, raw.assign(num_labeled=budget.num_labeled, arch=budget.arch))
    plot(raw, out.with_suffix(".png"))
    print(f"\nFashion-MNIST, {budget.num_labeled} labels, {budget.arch}, L-inf eps 0.1; test accuracy (%) on "
          f"{budget.eval_n} test images, mean ± std over seeds, by training examples:")
    print(summarize(raw).to_string(index=False))
    print("\nThe teacher on real test images and on each pool (agreement with the pool's own labels):")
    print(labeling_table(raw).to_string(index=False, float_format="%.2f"))
    print(f"total {(time.perf_counter() - start) / 60:.1f} min (cached stages count 0); rows in {out}, curves in "
          f"{out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
