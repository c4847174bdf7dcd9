"""`report.html`: one self-contained page per work dir that a person opens in a browser, no server.

The stage table (state, seconds, fingerprint), then one section per stage the work dir holds, which
the stage writes itself from its finished entry (`Stage.report`): this module never opens a stage's
files. A section that cannot be drawn becomes a line saying so, not a failed report.
"""
from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.atomic import atomic_write_text
from pipeline.core.errors import UserError

REPORT_NAME = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .note { color: #666; } code { background: #f4f4f4; padding: 0 .2em; }
"""


def write_report(workdir: Path, stage_rows: list[dict] | None = None, *, stages: dict | None = None,
                 config_note: str = "") -> Path:
    """Write `<workdir>/report.html` and return its path.

    `stage_rows`: one dict per stage, from the runner's plan: `name`, `state` ("fresh", "missing",
    "stale, <why>"), `fingerprint`, optionally `seconds` and `dir` (the stage's directory, when it is
    not `<workdir>/<name>`). Missing `seconds` are read from the stage's `stage.json`. Without rows, the
    table lists every `<workdir>/<stage>/stage.json` as recorded, freshness unchecked. `stages`: the
    registry (default: stages.STAGES); `config_note`: which config the states were checked against."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"Work dir {workdir} does not exist; give the --workdir of a run (default "
                        "runs/<config name>), or run the pipeline first.")
    if stages is None:
        from pipeline.stage_registry import stages as registered_stages

        stages = registered_stages()
    rows = (_recorded_rows(workdir, list(stages)) if stage_rows is None
            else [_with_record(workdir, r) for r in stage_rows])
    sections = [_stage_section(rows, checked=stage_rows is not None, config_note=config_note)]
    for row in rows:
        stage = stages.get(row["name"])
        if stage is not None and stage.report is not None and row["dir"].is_dir():
            sections.append(_contribution(row["name"], stage.report, row["dir"]))
    now = datetime.now(UTC).isoformat(timespec="seconds")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>rst-mart report: {_e(workdir.name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>rst-mart run report</h1>\n<p class=\"note\">Work dir <code>{_e(workdir.resolve())}</code>, "
            f"written {now}.</p>\n" + "\n".join(s for s in sections if s) + "\n</body>\n</html>\n")
    path = workdir / REPORT_NAME
    atomic_write_text(path, page)
    return path


def _contribution(name: str, report, entry: Path) -> str:
    """The stage's section under its name; a stage whose files are damaged gets a note instead."""
    try:
        body = report(entry)
    except Exception as e:  # one stage's unreadable files must not cost the user the whole page
        body = f"<p class=\"note\">this section could not be drawn ({_e(type(e).__name__)}: {_e(e)}).</p>"
    return f"<h2>{_e(name)}</h2>\n{body}" if body.strip() else ""


# -- the stages ---------------------------------------------------------------------------------------

def _stage_record(stage_dir: Path) -> dict:
    from pipeline.store import read_record  # bounded: a stage.json that is a FIFO or huge cannot hang the report

    return read_record(stage_dir) or {}


def _recorded_rows(workdir: Path, order: list[str]) -> list[dict]:
    names = [p.name for p in workdir.iterdir() if (p / "stage.json").is_file()]
    names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))  # registry order
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


def _stage_section(rows: list[dict], *, checked: bool, config_note: str) -> str:
    config_note = f"<p class=\"note\">{_e(config_note)}</p>\n" if config_note else ""
    if not rows:
        return "<h2>Stages</h2>\n" + config_note + "<p class=\"note\">No stage has finished in this work dir yet.</p>"
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
    return ("<h2>Stages</h2>\n" + config_note + note + "<table>\n<tr><th>stage</th><th>state</th><th>seconds</th>"
            "<th>finished (UTC)</th><th>fingerprint</th></tr>\n" + "\n".join(body) + "\n</table>")


# -- helpers ------------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
