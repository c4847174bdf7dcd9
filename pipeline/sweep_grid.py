"""`python -m pipeline sweep`: a grid of variants of one config, every shared stage built once.

`--set mart.beta=1,3,6 --set mart.unsup_fraction=0,0.5 --seeds 0,1` is 3 x 2 x 2 variants. Each variant is
an ordinary run in its own work dir under the sweep's directory; all of them use one stage store, so
stages whose fingerprints agree (the teacher across beta values, say) are built once. An interrupted
sweep resumes by running the same command: finished variants are cached, a killed one resumes from its
checkpoint. A list-valued key takes TOML lists as its values: `--set 'mart.milestones=[5,8],[6,9]'`.

Serially (the default) the variants run one after another in this process; `--launcher local|slurm`
runs each as a job (pipeline.sweep_jobs).
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

from pipeline.config import load_config, parse_override
from pipeline.core.atomic import atomic_path, atomic_write_csv
from pipeline.core.errors import UserError
from pipeline.runner import Runner
from pipeline.store import read_record, store_dir

SEED_KEY = "run.seed"
PLOT_AXIS = "plot_"  # _row's plot_x / plot_y: the columns sweep.png plots, dropped before sweep.csv


def split_values(text: str) -> list[str]:
    """Top-level comma-separated values ("[5,8],[6,9]" -> ["[5,8]", "[6,9]"])."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def expand_grid(overrides: list[str], seeds: str) -> tuple[list[str], list[list[str]]]:
    """(the keys that vary, one override list per variant)."""
    axes: list[tuple[str, list[str]]] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r} is not of the form section.key=value[,value...] "
                            f"(for example --set SECTION.KEY=1,3,6).")
        values = split_values(text)
        if not all(values):
            raise UserError(f"--set {item!r} has an empty value; give values separated by commas, "
                            f"e.g. --set {key.strip()}=1,3,6.")
        axes.append((key.strip(), values))
    if seeds:
        values = split_values(seeds)
        if not all(v.isdigit() for v in values):
            raise UserError(f"--seeds {seeds!r} must be comma-separated non-negative integers, e.g. --seeds 0,1,2.")
        axes.append((SEED_KEY, values))
    varied = [key for key, values in axes if len(values) > 1]
    grid = [[f"{key}={value}" for (key, _), value in zip(axes, combo)]
            for combo in itertools.product(*(values for _, values in axes))]
    return varied, grid


def variant_name(variant: list[str], varied: list[str]) -> str:
    parts = [item for item in variant if item.partition("=")[0] in varied] or ["base"]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def run_sweep(config_path, overrides: list[str], names: list[str], sweep_dir: Path, *, seeds: str = "",
              log=print) -> Path:
    """Run every variant, then write sweep.csv and sweep.png in `sweep_dir`; returns sweep.csv's path."""
    varied, grid = expand_grid(overrides, seeds)
    # Every variant's config is checked before the first one runs: a typo fails in a second.
    configs = [load_config(config_path, variant) for variant in grid]
    store = store_dir(configs[0].run.store, sweep_dir)
    rows = []
    for variant, config in zip(grid, configs):
        config.run.store = str(store)
        name = variant_name(variant, varied)
        log(f"== variant {name}")
        plans = Runner(config, sweep_dir / name, log=log).run(names)
        rows.append(_row(variant, varied, name, plans))
        write_table(sweep_dir, rows, varied)
    log(f"sweep: {len(rows)} variants in {sweep_dir / 'sweep.csv'} and sweep.png")
    return sweep_dir / "sweep.csv"


def _row(variant: list[str], varied: list[str], name: str, plans) -> dict:
    """The variant's values, seconds, fingerprints, and a `<stage>.<metric>` column for every row its stages
    contribute (`Stage.results`); the metrics a stage puts on an axis name sweep.png's columns."""
    row = {"variant": name}
    for item in variant:
        key, _, text = item.partition("=")
        if key in varied or key == SEED_KEY:
            row[key] = parse_override(item)[2]
    seconds = 0.0
    for plan in plans:
        record = read_record(plan.entry)  # bounded: a stage.json that is a FIFO or huge cannot hang the sweep
        if record is None:
            raise UserError(f"{plan.entry / 'stage.json'} cannot be read (missing, not a regular file, over "
                            f"1 MiB, or not JSON), though the run just checked it; rerun the sweep: it rebuilds "
                            f"the {plan.stage.name} stage if its entry is damaged.")
        seconds += record.get("seconds") if isinstance(record.get("seconds"), (int, float)) else float("nan")
        row[f"{plan.stage.name}_fingerprint"] = plan.fingerprint[:16]
    row["seconds"] = round(seconds, 1)
    for plan in plans:
        for result in plan.stage.results(plan.entry) if plan.stage.results is not None else ():
            column = f"{plan.stage.name}.{result['metric']}"
            row[column] = result["value"]
            if result.get("axis") in ("x", "y"):
                row[f"{PLOT_AXIS}{result['axis']}"] = column
    return row


def write_table(sweep_dir: Path, rows: list[dict], varied: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    axes = {axis: frame.pop(f"{PLOT_AXIS}{axis}").dropna() for axis in "xy" if f"{PLOT_AXIS}{axis}" in frame}
    atomic_write_csv(sweep_dir / "sweep.csv", frame)
    if len(axes) == 2 and len(axes["x"]) and len(axes["y"]):
        plot(frame, [k for k in varied if k != SEED_KEY], sweep_dir / "sweep.png", x=axes["x"].iloc[0],
             y=axes["y"].iloc[0])


def plot(frame, keys: list[str], path: Path, *, x: str, y: str) -> None:
    """Column y against column x (mart: PGD-20 against clean accuracy), one point per variant (seeds
    averaged, their spread as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = frame.groupby(keys, sort=False) if keys else [((), frame)]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, group in groups:
        label = label if isinstance(label, tuple) else (label,)
        text = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, label)) or "base"
        ax.errorbar(100 * group[x].mean(), 100 * group[y].mean(),
                    xerr=100 * group[x].std(ddof=0), yerr=100 * group[y].std(ddof=0),
                    fmt="o", capsize=3, label=text)
    ax.set_xlabel(f"{x} (%)")
    ax.set_ylabel(f"{y} (%)")
    ax.set_title("sweep: one point per variant (mean over seeds, error bars = std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
