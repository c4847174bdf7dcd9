"""The pieces stages build their contributions from: results rows read from a `results.csv`, and
report.html fragments (tables, training curves, embedded PNGs).

A stage's `results(entry)` and `report(entry)` (see pipeline.stage.Stage) read only that finished
entry's files. In a report a file that cannot be read becomes a line saying so, not a failed page.
Plots are PNGs embedded as base64 (the page is one self-contained file).

Every file is read through `read_entry_file`: a regular file (not a FIFO, a device or a symlink, which
could hang the reader or point at /dev/zero) of bounded size, so no file in an entry can hang `report`,
`run`'s results table or a sweep, or exhaust their memory.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.bounded import NotRegularFile, TooLarge, open_regular, read_regular
from pipeline.core.errors import UserError

TABLE_LIMIT_BYTES = 64 << 20  # a results.csv or metrics.csv holds KiB (one row per epoch or per attack)
PNG_LIMIT_BYTES = 32 << 20  # a figure of a few hundred KiB

# metrics.csv columns per panel of the training-curve figure, with the label each line gets.
CURVE_PANELS = (
    ("loss", {"loss": "training loss"}),
    ("learning rate", {"lr": "lr"}),
    ("accuracy", {"train_acc": "train (clean)", "train_adv_acc": "train (adversarial)",
                  "val_clean_acc": "validation clean", "val_pgd_acc": "validation PGD"}),
    ("throughput (images/s)", {"images_per_s": "images/s"}),
)


def read_entry_file(path: Path, limit_bytes: int) -> bytes:
    """The bytes of a file in a finished entry: NotRegularFile for a FIFO, device, directory or symlink
    (never followed), TooLarge over `limit_bytes`, OSError when it cannot be read."""
    return read_regular(path, limit_bytes, follow_symlinks=False)


def check_regular(path: Path) -> None:
    """NotRegularFile unless `path` is a regular file (for readers that open files themselves, as h5py
    does: opening a FIFO would block until someone writes to it)."""
    fd, _ = open_regular(path, follow_symlinks=False)
    os.close(fd)


def unreadable(error: Exception) -> str:
    """Why `path` could not be read, for a message: 'a FIFO (named pipe), not a regular file', ..."""
    if isinstance(error, NotRegularFile):
        return f"it is {error.kind}, not a regular file"
    if isinstance(error, TooLarge):
        return f"it holds {error.size} bytes or more, over the {error.limit >> 20} MiB limit"
    if isinstance(error, UnicodeDecodeError):
        return "it is not UTF-8 text"
    return getattr(error, "strerror", None) or type(error).__name__


def exists(path: Path) -> bool:
    """Is there anything at `path`, a dangling or foreign symlink included (which the reader then refuses)?"""
    return os.path.lexists(path)


# -- results rows -------------------------------------------------------------------------------------

def results_rows(path: Path, metric: Callable[[dict], str],
                 axis: Callable[[dict], str | None] = lambda row: None) -> list[dict]:
    """One row per line of a results.csv (`model, split, attack, eps, accuracy, n`): `metric` names
    it (unique within the stage), `value` is its accuracy, `axis` optionally puts it on sweep.png.
    No file, no rows (a stage whose results.csv is empty contributes nothing); a file that is not a
    regular file of sane size is a UserError naming it (the entry is damaged)."""
    if not exists(path):
        return []
    try:
        text = read_entry_file(path, TABLE_LIMIT_BYTES).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        entry = Path(path).absolute().parent
        stage = entry.parent.name if re.fullmatch(r"[0-9a-f]{64}", entry.name) else entry.name
        raise UserError(f"{path} cannot be read as a results table ({unreadable(error)}); rst-mart writes it "
                        f"as a small CSV file, so the entry was damaged after it was written. Rebuild it: "
                        f"python -m pipeline run --stages {stage} --force (with the same --config/--set).") from None
    rows = []
    for line in csv.DictReader(io.StringIO(text, newline="")):
        row = {"metric": metric(line), "value": _number(line.get("accuracy")), "model": line.get("model", ""),
               "split": line.get("split", ""), "attack": line.get("attack", ""),
               "eps": _number(line.get("eps")), "n": int(float(line["n"])) if line.get("n") else None}
        if axis(line):
            row["axis"] = axis(line)
        rows.append(row)
    return rows


def attack_metric(own_model: str) -> Callable[[dict], str]:
    """Metric names for a results.csv: `<attack>` for the stage's own model, `<model>.<attack>` else."""
    return lambda row: row["attack"] if row["model"] == own_model else f"{row['model']}.{row['attack']}"


def _number(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


# -- report fragments ---------------------------------------------------------------------------------

def csv_table(entry: Path, name: str, *, heading: str | None = None) -> str:
    """`<h3>name</h3>` and the file as a table; "" when the entry has no such file."""
    path = Path(entry) / name
    if not exists(path):
        return ""
    frame, problem = read_csv(path)
    return f"<h3>{e(heading or name)}</h3>\n" + (problem or table(frame))


def curves(entry: Path, title: str) -> str:
    """The training curves of the entry's metrics.csv; "" when it has none."""
    path = Path(entry) / "metrics.csv"
    if not exists(path):
        return ""
    frame, problem = read_csv(path)
    if problem:
        return "<h3>training curves</h3>\n" + problem
    if frame.empty or "epoch" not in frame:
        return f"<h3>training curves</h3>\n<p class=\"note\">{e(path.name)} has no epoch rows.</p>"
    return "<h3>training curves</h3>\n" + img(plot_curves(frame, title=f"{title}: per epoch"))


def plot_curves(frame, *, title: str):
    """A 2x2 figure of the metrics.csv columns in CURVE_PANELS against epoch; empty panels say so."""
    import pandas as pd
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 6.4), layout="constrained")
    figure.suptitle(title)
    epochs = frame["epoch"].to_numpy()
    for i, (panel, columns) in enumerate(CURVE_PANELS):
        axes = figure.add_subplot(2, 2, i + 1)
        axes.set(title=panel, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(epochs) == 1:  # one point: matplotlib would span it with fractional epochs
            axes.set_xlim(epochs[0] - 1, epochs[0] + 1)
        plotted = False
        for column, label in columns.items():
            if column in frame and frame[column].notna().any():
                values = pd.to_numeric(frame[column], errors="coerce").to_numpy()
                axes.plot(epochs, values, marker="o", markersize=3, label=label)
                plotted = True
        if not plotted:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes,
                      color="grey")
        elif panel == "accuracy":
            axes.set_ylim(-0.02, 1.02)
            axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    return figure


def png(entry: Path, name: str, *, heading: str) -> str:
    """A PNG the stage wrote, embedded; "" when there is none."""
    path = Path(entry) / name
    if not exists(path):
        return ""
    try:
        encoded = base64.b64encode(read_entry_file(path, PNG_LIMIT_BYTES)).decode("ascii")
    except OSError as error:
        return f"<h3>{e(heading)}</h3>\n" + _note(path, unreadable(error))
    return f"<h3>{e(heading)}</h3>\n<img alt=\"{e(name)}\" src=\"data:image/png;base64,{encoded}\">"


def read_csv(path: Path):
    """(frame, "") or (empty frame, a note for the page) when the file cannot be parsed."""
    import pandas as pd

    try:
        data = read_entry_file(path, TABLE_LIMIT_BYTES)
    except OSError as error:
        return pd.DataFrame(), _note(path, unreadable(error))
    try:
        return pd.read_csv(io.BytesIO(data)), ""
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        return pd.DataFrame(), _note(path, type(error).__name__)


def _note(path: Path, why: str) -> str:
    return f"<p class=\"note\">{e(Path(path).name)} could not be read ({e(why)}).</p>"


def table(frame) -> str:
    return frame.to_html(index=False, border=0, na_rep="", escape=True, float_format=lambda v: f"{v:.4f}")


def img(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    title = figure.get_suptitle() or (figure.axes[0].get_title() if figure.axes else "plot")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt=\"{e(title)}\" src=\"data:image/png;base64,{encoded}\">"


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)
