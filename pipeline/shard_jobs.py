"""`run --launcher local|slurm --jobs N`: a sharded stage's shards made by N jobs, before the run commits it.

Each job is `python -m pipeline run --stages <stage> --shard I/N` on the config the run recorded in its work
dir, which makes the missing shards s with s % N == I into the entry's partial directory (Runner.make_shards).
The run holds the entry's lock meanwhile, so no other run builds the same entry; when every job has
succeeded, the run makes whatever is still missing itself and commits the stage once. A job that did not
succeed stops the run with exit 2 naming its log; the shards made so far stay for the rerun.

`<workdir>/launch-<stage>.json` records the jobs, so that a rerun after the run itself was stopped (a
login session that ended) waits for those still queued or running on a scheduler instead of submitting
them again.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from pipeline.core.atomic import atomic_write_json
from pipeline.core.bounded import read_regular
from pipeline.core.errors import UserError
from pipeline.launchers import Job, Launcher, Submitted, tail
from pipeline.workdir_record import record_path


def shard_job_args(stage: str, fingerprint: str, *, workdir: Path, store: Path) -> tuple[str, ...]:
    """The `run` arguments every shard job shares (each adds --shard I/N): the recorded config, this store,
    and the fingerprint the job must agree with."""
    return ("--config", str(record_path(workdir).absolute()), "--workdir", str(Path(workdir).absolute()),
            "--set", f"run.store={Path(store).absolute()}", "--stages", stage, "--shard-of", fingerprint)


def make_shards(launcher: Launcher, stage: str, fingerprint: str, partial: Path, *, count: int, workdir: Path,
                store: Path, log: Callable[[str], None] = print) -> None:
    """Have `launcher` make the `count` shards of `stage` in min(launcher.jobs, count) jobs and wait for them;
    a UserError naming the first failed job's log if any did not succeed."""
    jobs = max(1, min(launcher.jobs, count))
    args = shard_job_args(stage, fingerprint, workdir=workdir, store=store)
    batch = [Job(f"{stage}-shard-{i}-of-{jobs}", "shard", (*args, "--shard", f"{i}/{jobs}"), cwd=os.getcwd())
             for i in range(jobs)]
    log(f"{stage}: {count} shards, made by {jobs} {launcher.name} job(s)")
    record_file = Path(workdir) / f"launch-{stage}.json"
    running = launcher.adopt(_recorded_jobs(record_file, launcher.name, fingerprint, {job.name for job in batch}))
    submitted = list(running.values()) + launcher.submit([job for job in batch if job.name not in running])
    atomic_write_json(record_file, {"launcher": launcher.name, "fingerprint": fingerprint,
                                    "jobs": {one.name: one.record() for one in submitted}})
    states = launcher.wait(submitted, on_change=lambda one, state: log(f"{stage}: job {one.name}: {state.text}"))
    failed = [one for one in submitted if not states[one.name].succeeded]
    if failed:
        first = failed[0]
        said = _error_line(launcher.logs(first)[-1])
        raise UserError(f"{len(failed)} of the {jobs} jobs making the shards of stage {stage} did not succeed; "
                        f"{first.name}: {launcher.describe(first, states[first.name])} ({said}). "
                        f"Nothing was committed; the shards made so far are kept in {partial}, and "
                        f"rerunning the same command makes only the missing ones.")


def _recorded_jobs(path: Path, launcher: str, fingerprint: str, names: set[str]) -> dict[str, Submitted]:
    """The jobs an earlier run recorded for this stage's entry, through this launcher, of the same names."""
    try:
        record = json.loads(read_regular(path, RECORD_LIMIT_BYTES))
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or (record.get("launcher"), record.get("fingerprint")) != (launcher, fingerprint):
        return {}
    return {name: Submitted.from_record(name, job) for name, job in record.get("jobs", {}).items() if name in names}


RECORD_LIMIT_BYTES = 1 << 20  # a record of jobs is a few KiB
_WRAPPER = re.compile(r"` exited with status -?\d+$")
_ERROR = re.compile(r"^(error: |[\w.]*(Error|Exception|Interrupt)\b)")


def _error_line(log: Path) -> str:
    """The line of a job's log that says what went wrong: its user error or its exception, else its last line."""
    # A SLURM job's error log ends with the wrapper's own "`python -m pipeline run ...` exited with status 1":
    # the run's error comes before it.
    lines = [line.strip() for line in tail(log, lines=40).splitlines() if not _WRAPPER.search(line)]
    at = next((i for i in reversed(range(len(lines))) if _ERROR.match(lines[i])), None)
    if at is None:
        return f"it says: {next((line for line in reversed(lines) if line), '(nothing)')}"
    end = lines.index("", at) if "" in lines[at:] else len(lines)  # a user error's paragraph is wrapped
    return f"it says: {' '.join(lines[at:end])}"
