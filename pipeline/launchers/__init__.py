"""Where jobs run: `serial` (in the caller's process), `local` (N processes on this machine) or `slurm`
(job arrays via submitit), all behind one interface (pipeline.launchers.base.Launcher).

A job is one ordinary `python -m pipeline run`, so a launched variant or shard is built exactly as the
serial run builds it, resumes the same way, and caches the same way. The launchers only start
processes; the store decides what is done.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.launchers.base import ROOT, Job, JobState, Launcher, Submitted, job_env, stage_lines, tail
from pipeline.launchers.local import LocalLauncher, SerialLauncher
from pipeline.launchers.slurm import SlurmLauncher

LAUNCHERS: dict[str, type[Launcher]] = {cls.name: cls for cls in (SerialLauncher, LocalLauncher, SlurmLauncher)}

__all__ = ["LAUNCHERS", "ROOT", "Job", "JobState", "Launcher", "Submitted", "job_env", "make_launcher",
           "stage_lines", "tail"]


def make_launcher(name: str, settings, *, folder: Path, jobs: int = 1, run_device: str = "auto",
                  flags: dict | None = None, log: Callable[[str], None] = print) -> Launcher:
    """The launcher `--launcher NAME` asks for, with the command line's flags over the [launcher] section."""
    if name not in LAUNCHERS:
        raise UserError(f"--launcher {name!r} is not one of {', '.join(LAUNCHERS)}.")
    for key, value in (flags or {}).items():
        if value is not None:
            setattr(settings, key, value)
    return LAUNCHERS[name](settings, folder=folder, jobs=jobs, run_device=run_device, log=log)
