"""The Launcher interface: submit `python -m pipeline run` jobs (with dependencies), ask their states, find
their logs.

A job is one ordinary `run` (a sweep's variant, the stages variants share, or some shards of a sharded
stage), so a launched job builds, resumes and caches exactly as the same command typed by hand. The
launchers only start processes; the store decides what is done. Callers (pipeline.sweep_jobs,
pipeline.shard_jobs) use only this interface; `pipeline.launchers.make_launcher` turns `--launcher NAME`
into one, so no caller branches on the launcher's name.
"""
from __future__ import annotations

import os
import shlex
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository root: jobs import this code


@dataclass(frozen=True)
class Job:
    name: str  # unique among the jobs of one launch: a variant, "shared-<variant>", "<stage>-shard-<i>-of-<n>"
    kind: str  # what the caller groups it as: "variant" | "shared" | "shard"
    args: tuple[str, ...]  # `python -m pipeline run` arguments (config, work dir, --set ..., --stages)
    python: str = sys.executable  # the interpreter the caller runs under (on a cluster: on the shared filesystem)
    cwd: str = str(ROOT)  # where the run starts: relative paths in its config are read from here

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", "pipeline", "run", *self.args]

    def __str__(self) -> str:
        return shlex.join(self.command)


@dataclass
class Submitted:
    """A job a launcher has taken. `info` holds the launcher's own facts about it (a SLURM job id; a local
    process's pid, exit status and log), which is what launch.json keeps and what states are read from."""

    name: str
    kind: str
    info: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"kind": self.kind, **self.info}

    @classmethod
    def from_record(cls, name: str, record: dict) -> Submitted:
        return cls(name, record["kind"], {k: v for k, v in record.items() if k != "kind"})


@dataclass(frozen=True)
class JobState:
    text: str  # what a user reads: "RUNNING (job 12_0)", "exit 0 in 3.1s, log ...", "FAILED (exit 2) ..."
    active: bool  # queued or running: the state may still change
    succeeded: bool = False  # ended and its run exited 0
    failed: bool = False  # ended, and certainly not well (an exit status other than 0, CANCELLED, TIMEOUT, ...)
    started: bool = True  # False: never started (a job it depended on failed)
    exit_code: int | None = None  # the run's exit status, where the launcher knows it


class Launcher(ABC):
    """Where jobs run. `folder` is the caller's directory (the sweep dir, the run's work dir) on a filesystem
    every job sees; each launcher keeps its logs in a folder of its own below it."""

    name: ClassVar[str]
    # True for serial: the caller does the work in its own process, as without a launcher; its `submit`
    # still runs jobs (one at a time, in the foreground) for a caller that needs separate processes.
    in_process: ClassVar[bool] = False
    # True where jobs outlive the process that submitted them (a scheduler's queue): a later launch then
    # finds them still queued or running (`adopt`) and waits for them instead of submitting them again.
    detaches: ClassVar[bool] = False

    def __init__(self, settings, *, folder: Path, jobs: int = 1, run_device: str = "auto",
                 log: Callable[[str], None] = print):
        self.settings = settings  # the [launcher] section (pipeline.config.LauncherConfig), flags applied
        self.folder = Path(folder)
        self.jobs = jobs  # jobs at once (local) or jobs a sharded stage is split into
        self.run_device = run_device
        self.log = log

    @property
    def world_size(self) -> int:
        """Processes per job (their runs plan for it: training's fingerprint depends on it)."""
        return 1

    def check(self) -> None:  # noqa: B027  a hook: most launchers have nothing to refuse
        """Refuse what cannot work (UserError with the fix) before anything is written or submitted."""

    def settings_record(self) -> dict:
        """What launch.json keeps beside the jobs."""
        return {}

    def adopt(self, previous: dict[str, Submitted]) -> dict[str, Submitted]:
        """Of the jobs an earlier launch recorded, those still queued or running (only a `detaches` launcher
        can have any)."""
        return {}

    @abstractmethod
    def submit(self, jobs: list[Job], *, after: list[Submitted] = ()) -> list[Submitted]:
        """Take `jobs`; each starts only once every job of `after` has succeeded, and never if one failed."""

    @abstractmethod
    def states(self, submitted: list[Submitted]) -> dict[str, JobState]:
        """Each job's state by name; never blocks (works from another process, from launch.json's records)."""

    @abstractmethod
    def wait(self, submitted: list[Submitted], *,
             on_change: Callable[[Submitted, JobState], None] = lambda s, state: None) -> dict[str, JobState]:
        """Block until none of `submitted` is active; `on_change` is called in this thread at each change."""

    @abstractmethod
    def logs(self, submitted: Submitted) -> list[Path]:
        """The job's log files: its output first, the one to read on failure last."""

    @abstractmethod
    def describe(self, submitted: Submitted, state: JobState) -> str:
        """How a failure names the job: "exit 2; its log is ...", "job 12_0 CANCELLED; its logs are ..."."""


def job_env(threads: int | None = None, base: dict | None = None) -> dict[str, str]:
    """The environment a job runs in: this worktree's code first on the path, and `threads` torch threads."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if threads:
        # torch sizes its intra-op pool from these at import: jobs sharing a machine then split its
        # cores instead of each starting one thread per core and thrashing.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def stage_lines(log_text: str, stage_names) -> list[str]:
    """The `<stage>: ran in 1.2s` / `<stage>: cached` lines of a run's log (progress bars left out)."""
    prefixes = tuple(f"{name}: " for name in stage_names)
    lines = log_text.replace("\r", "\n").splitlines()
    return [line for line in lines if line.startswith(prefixes) and "%|" not in line]


TAIL_BYTES = 64 << 10  # the end of a log that `tail` reads: a job's log can grow to gigabytes of progress bars


def tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - TAIL_BYTES))
            text = log.read().decode(errors="replace")
    except OSError:
        return "(no log yet)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty)"
