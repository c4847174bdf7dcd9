"""`report.html`: one self-contained page per work dir that a person opens in a browser, no server.

Sections, each present only where the work dir has the files behind it: the stage table (state,
seconds, fingerprint), training curves from every `metrics.csv`, pseudo-label quality (class and
confidence histograms from `pseudolabels.h5`, accuracy and calibration from `quality.csv` or, in runs
older than that file, the per-class rows of `pseudolabel/results.csv`), every `results.csv` and
`checks.csv`, and `eval/robustness.png`. Plots are PNGs embedded as base64, tables are HTML; a file
that cannot be read becomes a line saying so, not a failed report.
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.atomic import atomic_write_text
from pipeline.core.errors import UserError

STAGE_ORDER = ("teacher", "pseudolabel", "mart", "eval")
REPORT_NAME = "report.html"
# metrics.csv columns per panel of the training-curve figure, with the label each line gets.
CURVE_PANELS = (
    ("loss", {"loss": "training loss"}),
    ("learning rate", {"lr": "lr"}),
    ("accuracy", {"train_acc": "train (clean)", "train_adv_acc": "train (adversarial)",
                  "val_clean_acc": "validation clean", "val_pgd_acc": "validation PGD"}),
    ("throughput (images/s)", {"images_per_s": "images/s"}),
)
CONFIDENCE_BINS = 20
_H5_BLOCK_ROWS = 1 << 20  # labels + confidence are read this many rows at a time: 12 MiB, whatever the pool
_PER_CLASS_SPLIT = re.compile(r"^pool\[label=(.*)\]$")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .note { color: #666; } code { background: #f4f4f4; padding: 0 .2em; }
"""


def write_report(workdir: Path, stage_rows: list[dict] | None = None) -> Path:
    """Write `<workdir>/report.html` and return its path.

    `stage_rows`: one dict per stage, from the runner's plan: `name`, `state` ("fresh", "missing",
    "stale, <why>"), `fingerprint`, optionally `seconds` and `dir` (the stage's directory, when it is
    not `<workdir>/<name>`). Missing `seconds` are read from the stage's `stage.json`. Without rows, the
    table lists every `<workdir>/<stage>/stage.json` as recorded, freshness unchecked."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"Work dir {workdir} does not exist; give the --workdir of a run (default "
                        "runs/<config name>), or run the pipeline first.")
    rows = _recorded_rows(workdir) if stage_rows is None else [_with_record(workdir, r) for r in stage_rows]
    stage_dirs = {row["name"]: row["dir"] for row in rows if row["dir"].is_dir()}
    sections = [
        _stage_section(rows, checked=stage_rows is not None),
        _curves_section(stage_dirs),
        _pseudolabel_section(stage_dirs.get("pseudolabel")),
        _tables_section(stage_dirs),
        _robustness_section(stage_dirs.get("eval")),
    ]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>rst-mart report: {_e(workdir.name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>rst-mart run report</h1>\n<p class=\"note\">Work dir <code>{_e(workdir.resolve())}</code>, "
            f"written {now}.</p>\n" + "\n".join(sections) + "\n</body>\n</html>\n")
    path = workdir / REPORT_NAME
    atomic_write_text(path, page)
    return path


# -- the stages ---------------------------------------------------------------------------------------

def _stage_record(stage_dir: Path) -> dict:
    try:
        return json.loads((stage_dir / "stage.json").read_text())
    except (OSError, ValueError):
        return {}


def _recorded_rows(workdir: Path) -> list[dict]:
    names = [p.name for p in workdir.iterdir() if (p / "stage.json").is_file()]
    names.sort(key=lambda n: (STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER), n))
    rows = []
    for name in names:
        record = _stage_record(workdir / name)
        rows.append({"name": name, "state": "recorded", "fingerprint": record.get("fingerprint", ""),
                     "seconds": record.get("seconds"), "finished_at": record.get("finished_at", ""),
                     "dir": workdir / name, "on_disk": record.get("fingerprint", "")})
    return rows


def _with_record(workdir: Path, row: dict) -> dict:
    stage_dir = Path(row.get("dir") or workdir / row["name"])
    record = _stage_record(stage_dir)
    return {"name": row["name"], "state": row.get("state", ""), "fingerprint": row.get("fingerprint", ""),
            "seconds": row.get("seconds", record.get("seconds")), "finished_at": record.get("finished_at", ""),
            "dir": stage_dir, "on_disk": record.get("fingerprint", "")}


def _stage_section(rows: list[dict], *, checked: bool) -> str:
    if not rows:
        return "<h2>Stages</h2>\n<p class=\"note\">No stage has finished in this work dir yet.</p>"
    body = []
    for row in rows:
        seconds = f"{row['seconds']:.1f}" if isinstance(row["seconds"], (int, float)) else ""
        fingerprint = f"<code title=\"{_e(row['fingerprint'])}\">{_e(row['fingerprint'][:16])}</code>"
        if row["on_disk"] and row["on_disk"] != row["fingerprint"]:
            fingerprint += f" (on disk: <code title=\"{_e(row['on_disk'])}\">{_e(row['on_disk'][:16])}</code>)"
        body.append(f"<tr><td>{_e(row['name'])}</td><td>{_e(row['state'])}</td><td>{seconds}</td>"
                    f"<td>{_e(row['finished_at'])}</td><td>{fingerprint}</td></tr>")
    note = "" if checked else ("<p class=\"note\">Read from each stage's stage.json; whether a stage is still "
                               "fresh for the current config is what <code>python -m pipeline status</code> says."
                               "</p>\n")
    return ("<h2>Stages</h2>\n" + note + "<table>\n<tr><th>stage</th><th>state</th><th>seconds</th>"
            "<th>finished (UTC)</th><th>fingerprint</th></tr>\n" + "\n".join(body) + "\n</table>")


# -- training curves ----------------------------------------------------------------------------------

def _curves_section(stage_dirs: dict[str, Path]) -> str:
    parts = []
    for name, stage_dir in stage_dirs.items():
        path = stage_dir / "metrics.csv"
        if not path.exists():
            continue
        frame, problem = _read_csv(path)
        if problem:
            parts.append(f"<h3>{_e(name)}</h3>\n{problem}")
        elif frame.empty or "epoch" not in frame:
            parts.append(f"<h3>{_e(name)}</h3>\n<p class=\"note\">{_e(path.name)} has no epoch rows.</p>")
        else:
            parts.append(f"<h3>{_e(name)}</h3>\n" + _img(plot_curves(frame, title=f"{name}: per epoch")))
    if not parts:
        return ""
    return "<h2>Training curves</h2>\n" + "\n".join(parts)


def plot_curves(frame: pd.DataFrame, *, title: str):
    """A 2x2 figure of the metrics.csv columns in CURVE_PANELS against epoch; empty panels say so."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 6.4), layout="constrained")
    figure.suptitle(title)
    epochs = frame["epoch"].to_numpy()
    for i, (panel, columns) in enumerate(CURVE_PANELS):
        axes = figure.add_subplot(2, 2, i + 1)
        axes.set(title=panel, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
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


# -- pseudo-labels ------------------------------------------------------------------------------------

def pseudolabel_summary(h5_path: Path) -> dict[str, Any]:
    """Per-class counts and mean confidence and a confidence histogram, reading only the `labels` and
    `confidence` datasets, a block of rows at a time (a pool of 50M rows would be 600 MB at once)."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        labels, confidence = f["labels"], f["confidence"]
        rows = min(len(labels), int(f.attrs.get("rows_written", len(labels))))
        num_classes = int(f.attrs.get("num_classes", 0))
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs.get("class_names", [])]
        counts = np.zeros(max(num_classes, len(names)), dtype=np.int64)
        confidence_sums = np.zeros(len(counts))
        histogram = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
        edges = np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)
        for start in range(0, rows, _H5_BLOCK_ROWS):
            block_labels = labels[start:start + _H5_BLOCK_ROWS].astype(np.int64)
            block_confidence = confidence[start:start + _H5_BLOCK_ROWS].astype(np.float64)
            size = max(len(counts), int(block_labels.max(initial=-1)) + 1)
            counts = np.pad(counts, (0, size - len(counts)))
            confidence_sums = np.pad(confidence_sums, (0, size - len(confidence_sums)))
            counts += np.bincount(block_labels, minlength=size)
            confidence_sums += np.bincount(block_labels, weights=block_confidence, minlength=size)
            histogram += np.histogram(block_confidence, bins=edges)[0]
    names += [str(k) for k in range(len(names), len(counts))]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, confidence_sums / counts, np.nan)
    return {"rows": rows, "class_names": names, "counts": counts, "mean_confidence": mean_confidence,
            "confidence_histogram": histogram, "confidence_edges": edges}


def _quality_table(stage_dir: Path, summary: dict | None) -> tuple[pd.DataFrame | None, str]:
    """(class, count, precision, mean_confidence) from quality.csv, else from results.csv's per-class rows
    with the mean confidence from the h5 file; and a note saying where it came from."""
    quality_path = stage_dir / "quality.csv"
    if quality_path.exists():
        frame, problem = _read_csv(quality_path)
        if not problem and {"class", "count", "precision", "mean_confidence"} <= set(frame.columns):
            return frame, "from quality.csv"
    results_path = stage_dir / "results.csv"
    if not results_path.exists():
        return None, ""
    results, problem = _read_csv(results_path)
    if problem or "split" not in results:
        return None, ""
    rows = []
    confidence_by_name = ({n: c for n, c in zip(summary["class_names"], summary["mean_confidence"])}
                          if summary else {})
    for _, row in results.iterrows():
        match = _PER_CLASS_SPLIT.match(str(row["split"]))
        if match:
            rows.append({"class": match.group(1), "count": row["n"], "precision": row["accuracy"],
                         "mean_confidence": confidence_by_name.get(match.group(1), np.nan)})
    if not rows:
        return None, ""
    return pd.DataFrame(rows), "from the per-class rows of results.csv (this run predates quality.csv)"


def _pseudolabel_section(stage_dir: Path | None) -> str:
    if stage_dir is None:
        return ""
    parts = []
    summary = None
    h5_path = stage_dir / "pseudolabels.h5"
    if h5_path.exists():
        try:
            summary = pseudolabel_summary(h5_path)
        except (OSError, KeyError, ValueError) as e:
            parts.append(f"<p class=\"note\">{_e(h5_path.name)} could not be read ({_e(type(e).__name__)}: "
                         f"{_e(e)}).</p>")
    if summary is not None:
        parts.append(f"<p>{summary['rows']:,} pseudo-labeled pool images.</p>")
        parts.append(_img(plot_pseudolabels(summary)))
    quality, source = _quality_table(stage_dir, summary)
    if quality is not None:
        known = quality[pd.to_numeric(quality["precision"], errors="coerce").notna()]
        if len(known) and known["count"].sum() > 0:
            accuracy = float((known["count"] * known["precision"]).sum() / known["count"].sum())
            parts.append(f"<p>Pseudo-label accuracy where the truth is known: <b>{accuracy:.2%}</b> "
                         f"({int(known['count'].sum()):,} images).</p>")
            parts.append(_img(plot_calibration(known)))
        parts.append(f"<p class=\"note\">Per predicted class, {_e(source)}: precision is the fraction of "
                     "images given that label whose true label it is.</p>" + _table(quality))
    if not parts:
        return ""
    return "<h2>Pseudo-labels</h2>\n" + "\n".join(parts)


def plot_pseudolabels(summary: dict):
    """Images per pseudo-label class, and the teacher's confidence histogram."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    classes, confidence = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    positions = np.arange(len(summary["counts"]))
    classes.bar(positions, summary["counts"], color="C0")
    classes.set_xticks(positions, summary["class_names"], rotation=45, ha="right", fontsize="small")
    classes.set(title="images per pseudo-label", ylabel="images")
    edges = summary["confidence_edges"]
    confidence.bar(edges[:-1], summary["confidence_histogram"], width=np.diff(edges), align="edge",
                   color="C1", edgecolor="white")
    confidence.set(title="teacher confidence (softmax of the label)", xlabel="confidence", ylabel="images",
                   xlim=(0, 1))
    for axes in (classes, confidence):
        axes.grid(alpha=0.3, axis="y")
    return figure


def plot_calibration(quality: pd.DataFrame):
    """Per-class precision against mean confidence: on the diagonal when the teacher is calibrated."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.2, 4.6), layout="constrained")
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    points = quality[pd.to_numeric(quality["mean_confidence"], errors="coerce").notna()]
    axes.scatter(points["mean_confidence"], points["precision"], s=20 + 200 * points["count"] / max(
        1, points["count"].max()), alpha=0.7, color="C2", label="class (size: images)")
    for _, row in points.iterrows():
        axes.annotate(str(row["class"]), (row["mean_confidence"], row["precision"]), fontsize="x-small",
                      xytext=(4, 2), textcoords="offset points")
    axes.set(title="calibration per pseudo-label class", xlabel="mean confidence", ylabel="precision",
             xlim=(0, 1.02), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    return figure


# -- tables and the eval plot -----------------------------------------------------------------------

def _tables_section(stage_dirs: dict[str, Path]) -> str:
    parts = []
    for name, stage_dir in stage_dirs.items():
        for file_name in ("results.csv", "checks.csv"):
            path = stage_dir / file_name
            if path.exists():
                frame, problem = _read_csv(path)
                parts.append(f"<h3>{_e(name)}/{file_name}</h3>\n" + (problem or _table(frame)))
    if not parts:
        return ""
    return "<h2>Results</h2>\n<p class=\"note\">Accuracies as fractions, on the first n images.</p>\n" + "\n".join(parts)


def _robustness_section(stage_dir: Path | None) -> str:
    path = stage_dir / "robustness.png" if stage_dir is not None else None
    if path is None or not path.exists():
        return ""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return ("<h2>Robustness</h2>\n<img alt=\"eval/robustness.png\" "
            f"src=\"data:image/png;base64,{encoded}\">")


# -- helpers ------------------------------------------------------------------------------------------

def _read_csv(path: Path) -> tuple[pd.DataFrame, str]:
    """(frame, "") or (empty frame, a note for the page) when the file cannot be parsed."""
    try:
        return pd.read_csv(path), ""
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        return pd.DataFrame(), f"<p class=\"note\">{_e(path.name)} could not be read ({_e(type(e).__name__)}).</p>"


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, na_rep="", escape=True,
                         float_format=lambda v: f"{v:.4f}")


def _img(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    title = figure.get_suptitle() or (figure.axes[0].get_title() if figure.axes else "plot")
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt=\"{_e(title)}\" src=\"data:image/png;base64,{encoded}\">"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
