"""The pseudolabel stage's report.html section: class and confidence histograms from `pseudolabels.h5`,
accuracy and calibration from `quality.csv` (or, in runs older than that file, the per-class rows of
`results.csv`), and its results table. Readable from 2 to a few hundred classes.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stages.reporting import check_regular, csv_table, e, exists, img, read_csv, table

ALL_CLASSES = "all"  # quality.csv's total row: never counted with the per-class rows
LABELLED_POINTS = 10  # calibration classes named on the plot (the farthest from the diagonal)
MAX_CLASS_TICKS = 20  # class names under the histogram; more classes get every k-th name
_PER_CLASS_SPLIT = re.compile(r"^pool\[label=(.*)\]$")


def report(entry: Path) -> str:
    from data.pseudolabel_file import pseudolabel_summary

    parts = []
    summary = None
    h5_path = Path(entry) / "pseudolabels.h5"
    if exists(h5_path):
        try:
            check_regular(h5_path)  # h5py would block on a FIFO
            summary = pseudolabel_summary(h5_path)
        except (OSError, KeyError, ValueError) as error:
            parts.append(f"<p class=\"note\">{e(h5_path.name)} could not be read ({e(type(error).__name__)}: "
                         f"{e(error)}).</p>")
    if summary is not None:
        parts.append(f"<p>{summary['rows']:,} pseudo-labeled pool images.</p>")
        parts.append(img(plot_pseudolabels(summary)))
    quality, source = quality_table(Path(entry), summary)
    if quality is not None:
        import pandas as pd

        per_class = quality[quality["class"].astype(str) != ALL_CLASSES]
        known = per_class[pd.to_numeric(per_class["precision"], errors="coerce").notna()]
        if len(known) and known["count"].sum() > 0:
            accuracy = float((known["count"] * known["precision"]).sum() / known["count"].sum())
            parts.append(f"<p>Pseudo-label accuracy where the truth is known: <b>{accuracy:.2%}</b> "
                         f"({int(known['count'].sum()):,} images).</p>")
            parts.append(img(plot_calibration(known)))
        parts.append(f"<p class=\"note\">Per predicted class, {e(source)}: precision is the fraction of "
                     "images given that label whose true label it is.</p>" + table(quality))
    parts.append(csv_table(entry, "results.csv"))
    return "\n".join(p for p in parts if p)


def quality_table(entry: Path, summary: dict | None):
    """(class, count, precision, mean_confidence) from quality.csv, else from results.csv's per-class rows
    with the mean confidence from the h5 file; and a note saying where it came from."""
    import pandas as pd

    quality_path = entry / "quality.csv"
    if exists(quality_path):
        frame, problem = read_csv(quality_path)
        if not problem and {"class", "count", "precision", "mean_confidence"} <= set(frame.columns):
            return frame, "from quality.csv"
    results_path = entry / "results.csv"
    if not exists(results_path):
        return None, ""
    results, problem = read_csv(results_path)
    if problem or "split" not in results:
        return None, ""
    confidence_by_name = ({n: c for n, c in zip(summary["class_names"], summary["mean_confidence"])}
                          if summary else {})
    rows = []
    for _, row in results.iterrows():
        match = _PER_CLASS_SPLIT.match(str(row["split"]))
        if match:
            rows.append({"class": match.group(1), "count": row["n"], "precision": row["accuracy"],
                         "mean_confidence": confidence_by_name.get(match.group(1), np.nan)})
    if not rows:
        return None, ""
    return pd.DataFrame(rows), "from the per-class rows of results.csv (this run predates quality.csv)"


def plot_pseudolabels(summary: dict):
    """Images per pseudo-label class, and the teacher's confidence histogram."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    classes, confidence = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    counts, names = summary["counts"], summary["class_names"]
    positions = np.arange(len(counts))
    classes.bar(positions, counts, color="C0", width=0.8 if len(counts) <= MAX_CLASS_TICKS else 1.0)
    # Every name while they fit; past MAX_CLASS_TICKS every k-th, upright, so none overlap.
    step = max(1, -(-len(counts) // MAX_CLASS_TICKS))
    shown = positions[::step]
    classes.set_xticks(shown, [names[i] for i in shown], rotation=45 if step == 1 else 90,
                       ha="right" if step == 1 else "center", fontsize="small")
    classes.set(title="images per pseudo-label" + (f" (every {step}th class named)" if step > 1 else ""),
                ylabel="images", xlim=(-0.7, len(counts) - 0.3))
    edges = summary["confidence_edges"]
    confidence.bar(edges[:-1], summary["confidence_histogram"], width=np.diff(edges), align="edge",
                   color="C1", edgecolor="white")
    confidence.set(title="teacher confidence (softmax of the label)", xlabel="confidence", ylabel="images",
                   xlim=(0, 1))
    for axes in (classes, confidence):
        axes.grid(alpha=0.3, axis="y")
    return figure


def plot_calibration(quality):
    """Per-class precision against mean confidence: on the diagonal when the teacher is calibrated.

    Only the LABELLED_POINTS classes farthest from the diagonal are named, in a column of labels at the
    plot's left edge with a line to each point: names next to clustered points would overlap."""
    import pandas as pd
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 5.2), layout="constrained")
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    points = quality[pd.to_numeric(quality["mean_confidence"], errors="coerce").notna()].copy()
    points["mean_confidence"] = points["mean_confidence"].astype(float)
    points["precision"] = points["precision"].astype(float)
    size = 120 if len(points) <= MAX_CLASS_TICKS else 30  # many classes: small dots, so a cluster stays legible
    axes.scatter(points["mean_confidence"], points["precision"], s=8 + size * points["count"] / max(
        1, points["count"].max()), alpha=0.6, color="C2", label="class (size: images)")
    gap = (points["mean_confidence"] - points["precision"]).abs()
    named = points.loc[gap.sort_values(ascending=False).index[:LABELLED_POINTS]].sort_values("precision")
    # Labels stacked top-down, in the points' precision order so the connecting lines seldom cross, in
    # the triangle the points leave empty: above the diagonal for an overconfident teacher (the usual
    # case), below it for an underconfident one.
    underconfident = (points["precision"] > points["mean_confidence"]).mean() > 0.5
    x, y0, align = (0.97, 0.62, "right") if underconfident else (0.03, 0.97, "left")
    for k, (_, row) in enumerate(named.iloc[::-1].iterrows()):
        axes.annotate(str(row["class"]), (row["mean_confidence"], row["precision"]),
                      xytext=(x, y0 - 0.058 * k), textcoords="axes fraction", fontsize="small", va="top", ha=align,
                      arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.6, "shrinkB": 3})
    named_note = (f"{len(named)} farthest from the diagonal named" if len(points) > len(named) else "")
    axes.set(title="calibration per pseudo-label class" + (f"\n({named_note})" if named_note else ""),
             xlabel="mean confidence", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper center" if underconfident else "lower right")
    return figure
