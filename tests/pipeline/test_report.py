"""report.html on a fake work dir the tests write: it parses, embeds real PNGs and the tables, reads the
pseudo-label quality from quality.csv or falls back to results.csv, and survives missing or broken pieces."""
import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data.pseudolabel_file import pseudolabel_summary
from pipeline.core.errors import UserError
from pipeline.report import write_report

CLASS_NAMES = ["shirt", "boot", "bag"]
VOID_TAGS = {"meta", "img", "br", "hr", "link", "input"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class Page(HTMLParser):
    """Collects images, tables (rows of cell texts) and text, and fails on unbalanced tags (a truncated
    or mangled page)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.images, self.tables, self.headings, self.text = [], [], [], [], []
        self._heading = self._cell = None
        self.feed(text)
        self.close()
        assert self.stack == [], f"unclosed tags {self.stack}"

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in VOID_TAGS:
            self.stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag in ("h2", "h3"):
            self._heading = []

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("h2", "h3"):
            self.headings.append("".join(self._heading))
            self._heading = None
        elif tag in ("td", "th"):
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        for part in (self._heading, self._cell):
            if part is not None:
                part.append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())

    def table_with(self, header: str) -> list[dict]:
        """The rows, as dicts by header, of the first table whose header row has `header`."""
        table = next(t for t in self.tables if t and header in t[0])
        return [dict(zip(table[0], row)) for row in table[1:]]


def png_size(image: dict) -> tuple[int, int]:
    prefix = "data:image/png;base64,"
    assert image["src"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(image["src"][len(prefix):]))) as png:
        assert png.format == "PNG"
        return png.size


def write_stage(workdir, name, fingerprint, seconds, files: dict):
    stage_dir = workdir / name
    stage_dir.mkdir(parents=True)
    (stage_dir / "stage.json").write_text(json.dumps({
        "stage": name, "fingerprint": fingerprint, "seconds": seconds, "finished_at": "2026-11-25T10:00:00+00:00",
        "params": {}, "inputs": {}, "code_version": f"{name}/v1", "outputs": {}}))
    for file_name, frame in files.items():
        frame.to_csv(stage_dir / file_name, index=False)
    return stage_dir


def metrics(epochs: int, validation: bool) -> pd.DataFrame:
    frame = pd.DataFrame({"epoch": range(1, epochs + 1), "step": [10 * e for e in range(1, epochs + 1)],
                          "loss": np.linspace(2.0, 0.5, epochs), "lr": np.linspace(0.1, 0.001, epochs),
                          "train_acc": np.linspace(0.3, 0.9, epochs),
                          "train_adv_acc": np.linspace(0.1, 0.5, epochs) if validation else np.nan,
                          "images_per_s": 500.0, "seconds": 3.0})
    if validation:
        frame["val_clean_acc"] = np.linspace(0.4, 0.8, epochs)
        frame["val_pgd_acc"] = np.linspace(0.2, 0.6, epochs)
    return frame


def results(model: str, rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame([{"model": model, "split": split, "attack": attack, "eps": eps, "accuracy": acc, "n": n}
                         for split, attack, eps, acc, n in rows])


def write_pseudolabels(path, labels, confidence):
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("confidence", data=np.asarray(confidence, dtype=np.float32))
        f.create_dataset("images", data=np.zeros((len(labels), 2, 2, 1), dtype=np.uint8))
        f.attrs["num_classes"] = len(CLASS_NAMES)
        f.attrs["class_names"] = CLASS_NAMES
        f.attrs["complete"] = 1


# 60 shirts at confidence 0.9, 40 boots at 0.6, no bag.
LABELS = [0] * 60 + [1] * 40
CONFIDENCE = [0.9] * 60 + [0.6] * 40
PER_CLASS = [("shirt", 60, 0.9), ("boot", 40, 0.5), ("bag", 0, float("nan"))]


@pytest.fixture
def full_workdir(tmp_path):
    """A finished teacher, pseudolabel, mart and eval, as the stages lay them out."""
    workdir = tmp_path / "run"
    write_stage(workdir, "teacher", "a" * 64, 68.25, {
        "metrics.csv": metrics(4, validation=False),
        "results.csv": results("teacher", [("test", "clean", 0.0, 0.8657, 10000)])})
    pseudo = write_stage(workdir, "pseudolabel", "b" * 64, 21.0, {
        "results.csv": results("teacher", [("pool", "pseudolabel", 0.0, 0.74, 100)] + [
            (f"pool[label={name}]", "pseudolabel", 0.0, precision, count) for name, count, precision in PER_CLASS]),
        "quality.csv": pd.DataFrame([{"class": name, "count": count, "precision": precision,
                                      "mean_confidence": {"shirt": 0.9, "boot": 0.6}.get(name, np.nan)}
                                     for name, count, precision in PER_CLASS])})
    write_pseudolabels(pseudo / "pseudolabels.h5", LABELS, CONFIDENCE)
    write_stage(workdir, "mart", "c" * 64, 374.4, {
        "metrics.csv": metrics(5, validation=True),
        "results.csv": results("mart", [("test", "clean", 0.0, 0.8065, 2000), ("test", "pgd20", 0.1, 0.7125, 2000)])})
    eval_dir = write_stage(workdir, "eval", "d" * 64, 132.0, {
        "results.csv": results("mart", [("test", "fgsm", 0.1, 0.742, 1000)]),
        "checks.csv": pd.DataFrame([{"model": "mart", "check": "pgd <= fgsm", "passed": True,
                                     "detail": "0.71 <= 0.74"}])})
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 2))
    figure.add_subplot().plot([0, 0.1, 0.2], [0.8, 0.7, 0.15])
    figure.savefig(eval_dir / "robustness.png", format="png")
    return workdir


def test_full_report_embeds_every_plot_and_table(full_workdir):
    path = write_report(full_workdir)
    assert path == full_workdir / "report.html"
    page = Page(path.read_text())
    # teacher curves, mart curves, pseudo-label histograms, calibration, robustness.png
    assert len(page.images) == 5
    sizes = [png_size(image) for image in page.images]
    assert all(w >= 200 and h >= 150 for w, h in sizes)
    # One section per stage, each written by the stage from its own entry.
    assert page.headings == ["Stages", "teacher", "training curves", "results.csv", "pseudolabel", "results.csv",
                             "mart", "training curves", "results.csv", "eval", "results.csv", "checks.csv",
                             "robustness"]
    assert len(page.tables) == 1 + 1 + 5  # stages, pseudo-label quality, four results.csv and one checks.csv
    stages = page.table_with("stage")
    assert [r["stage"] for r in stages] == ["teacher", "pseudolabel", "mart", "eval"]
    assert stages[2]["seconds"] == "374.4" and stages[2]["fingerprint"] == "c" * 16
    text = page.all_text
    for expected in ("aaaaaaaaaaaaaaaa", "dddddddddddddddd", "68.2", "374.4", "0.8065", "0.7125", "pgd <= fgsm",
                     "100 pseudo-labeled pool images", "74.00%", "from quality.csv", "recorded"):
        assert expected in text, expected
    assert not [p.name for p in full_workdir.iterdir() if p.name.startswith(".")]  # no temp file left


def test_quality_falls_back_to_results_rows_with_confidence_from_h5(full_workdir):
    (full_workdir / "pseudolabel" / "quality.csv").unlink()
    page = Page(write_report(full_workdir).read_text())
    text = page.all_text
    assert "predates quality.csv" in text and "74.00%" in text
    # The mean confidence of each class comes from the h5 file: no CSV holds it in this run.
    quality = {row["class"]: row for row in page.table_with("mean_confidence")}
    assert quality["boot"]["mean_confidence"] == "0.6000" and quality["shirt"]["mean_confidence"] == "0.9000"
    assert quality["boot"]["precision"] == "0.5000" and quality["bag"]["mean_confidence"] == ""
    assert len(page.images) == 5


def test_stage_rows_from_the_runner(full_workdir, tmp_path):
    store_entry = tmp_path / "store" / "mart" / ("e" * 64)
    shutil.copytree(full_workdir / "mart", store_entry)
    shutil.rmtree(full_workdir / "mart")
    rows = [{"name": "teacher", "state": "fresh", "fingerprint": "a" * 64},
            {"name": "pseudolabel", "state": "stale, input teacher changed", "fingerprint": "f" * 64},
            {"name": "mart", "state": "stale, mart.beta changed (6.0 -> 3.0) <b>", "fingerprint": "e" * 64,
             "dir": store_entry},
            {"name": "eval", "state": "missing", "fingerprint": "9" * 64, "dir": tmp_path / "nowhere"}]
    page = Page(write_report(full_workdir, rows).read_text())
    text = page.all_text
    assert "mart.beta changed (6.0 -> 3.0) <b>" in text  # escaped: shown, not parsed as a tag
    assert "on disk: bbbbbbbbbbbbbbbb" in text  # stale pseudolabel: the recorded fingerprint differs
    assert "68.2" in text and "374.4" in text  # seconds from stage.json when the row has none
    assert "Read from each stage's stage.json" not in text
    assert "eval" not in page.headings  # eval is missing: its dir is not read
    assert "mart" in page.headings  # curves read from the store entry the row points at


def test_missing_pieces(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_report(tmp_path / "nope")

    empty = tmp_path / "empty"
    empty.mkdir()
    page = Page(write_report(empty).read_text())
    assert page.headings == ["Stages"] and page.images == []
    assert "No stage has finished" in page.all_text

    only_teacher = tmp_path / "teacher-only"
    write_stage(only_teacher, "teacher", "a" * 64, 5.0, {})
    (only_teacher / "pseudolabel.partial").mkdir()  # a running stage is not a finished one
    page = Page(write_report(only_teacher).read_text())
    assert page.headings == ["Stages"] and len(page.tables) == 1 and page.images == []

    # An imported teacher trains nothing: its metrics.csv is the header alone.
    metrics(1, validation=False).iloc[:0].to_csv(only_teacher / "teacher" / "metrics.csv", index=False)
    page = Page(write_report(only_teacher).read_text())
    assert "metrics.csv has no epoch rows" in page.all_text and page.images == []


def test_pseudolabels_without_truth_or_h5(tmp_path):
    workdir = tmp_path / "run"
    stage = write_stage(workdir, "pseudolabel", "b" * 64, 1.0, {
        "results.csv": results("teacher", [("pool", "agreement-with-provided", 0.0, float("nan"), 100)])})
    write_pseudolabels(stage / "pseudolabels.h5", LABELS, CONFIDENCE)
    page = Page(write_report(workdir).read_text())
    assert len(page.images) == 1  # histograms only: no calibration without per-class truth
    assert "accuracy where the truth is known" not in page.all_text

    (stage / "pseudolabels.h5").unlink()
    page = Page(write_report(workdir).read_text())
    assert "pseudo-labeled pool images" not in page.all_text and page.images == []


def test_broken_files_become_notes(full_workdir):
    (full_workdir / "teacher" / "metrics.csv").write_text("")
    (full_workdir / "mart" / "results.csv").write_bytes(b'a,b\n"unterminated\n')
    (full_workdir / "pseudolabel" / "pseudolabels.h5").write_bytes(b"not hdf5")
    page = Page(write_report(full_workdir).read_text())
    text = page.all_text
    assert "metrics.csv could not be read" in text
    assert "results.csv could not be read" in text
    assert "pseudolabels.h5 could not be read" in text


def test_h5_summary_reads_in_blocks(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1000)
    confidence = rng.uniform(0.3, 1.0, 1000).astype(np.float32)
    write_pseudolabels(tmp_path / "p.h5", labels, confidence)
    summary = pseudolabel_summary(tmp_path / "p.h5", block_rows=37)
    assert summary["rows"] == 1000 and summary["class_names"] == CLASS_NAMES
    assert summary["counts"].tolist() == np.bincount(labels, minlength=3).tolist()
    assert summary["mean_confidence"] == pytest.approx([confidence[labels == k].mean() for k in range(3)], rel=1e-5)
    assert summary["confidence_histogram"].sum() == 1000
    assert summary["confidence_histogram"][:6].sum() == 0  # nothing below 0.3


def test_renders_in_headless_chromium(full_workdir, tmp_path):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium installed: the page is checked by parsing only")
    path = write_report(full_workdir)
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1200,3000", path.as_uri()], check=True, capture_output=True, timeout=120)
    with Image.open(shot) as png:
        assert png.size == (1200, 3000)


def many_class_workdir(tmp_path, k: int):
    """A pseudolabel stage of k classes as the stage writes it: quality.csv with its `all` row, results.csv
    with the pool accuracy, an h5 file of 50 images per class at clustered confidences."""
    rng = np.random.default_rng(k)
    names = [f"class_{c:02d}_name" for c in range(k)]
    labels = np.repeat(np.arange(k), 50)
    confidence = np.clip(rng.normal(0.9, 0.05, len(labels)), 0, 1)
    precision = np.clip(rng.normal(0.88, 0.06, k), 0, 1)
    precision[:2] = (0.35, 0.5)  # two badly calibrated classes to name
    mean_confidence = np.array([confidence[labels == c].mean() for c in range(k)])
    quality = pd.DataFrame({"class": names, "count": 50, "precision": precision, "mean_confidence": mean_confidence,
                            "measured_against": "dataset labels"})
    total = {"class": "all", "count": 50 * k, "precision": precision.mean(), "mean_confidence": confidence.mean(),
             "measured_against": "dataset labels"}
    workdir = tmp_path / f"run{k}"
    stage = write_stage(workdir, "pseudolabel", "b" * 64, 1.0, {
        "quality.csv": pd.concat([quality, pd.DataFrame([total])], ignore_index=True),
        "results.csv": results("teacher", [("pool", "clean", 0.0, precision.mean(), 50 * k)])})
    with h5py.File(stage / "pseudolabels.h5", "w") as f:
        f.create_dataset("labels", data=labels)
        f.create_dataset("confidence", data=confidence.astype(np.float32))
        f.attrs["num_classes"] = k
        f.attrs["class_names"] = names
    return workdir


@pytest.mark.parametrize("k", [10, 100])
def test_pseudolabel_section_counts_each_image_once_at_10_and_100_classes(tmp_path, k):
    page = Page(write_report(many_class_workdir(tmp_path, k)).read_text())
    text = page.all_text
    assert f"{50 * k:,} pseudo-labeled pool images" in text
    assert f"({50 * k:,} images)" in text  # quality.csv's `all` row is not counted a second time
    assert len(page.images) == 2 and all(png_size(image)[0] >= 500 for image in page.images)
    assert len(page.table_with("mean_confidence")) == k + 1


def test_renders_at_100_classes_in_headless_chromium(tmp_path):
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium installed: the page is checked by parsing only")
    path = write_report(many_class_workdir(tmp_path, 100))
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1400,3000", path.as_uri()], check=True, capture_output=True, timeout=120)
    with Image.open(shot) as png:
        assert png.size == (1400, 3000)
        assert len(png.convert("L").getcolors(1 << 16)) > 2  # something was drawn, not a blank page


def test_a_stage_whose_section_fails_gets_a_note_and_the_others_their_sections(full_workdir):
    from pipeline.stage import Stage
    from pipeline.stage_registry import stages as registered_stages

    def broken(entry):
        raise KeyError("labels")

    mart = Stage(name="mart", version=1, section="mart", outputs=(), run=lambda ctx: None, report=broken)
    stages = dict(registered_stages(), mart=mart)
    page = Page(write_report(full_workdir, stages=stages).read_text())
    assert "this section could not be drawn (KeyError: 'labels')" in page.all_text
    assert [h for h in page.headings if h in registered_stages()] == ["teacher", "pseudolabel", "mart", "eval"]
    assert len(page.images) == 4  # mart's curves are missing, every other plot is there
