"""Where a sweep's jobs run: `local` (N processes on this machine) or `slurm` (job arrays via submitit).

A job is one ordinary `python -m pipeline run` in its own work dir on the sweep's store, so a launched
variant is built exactly as the serial sweep builds it, resumes the same way, and caches the same way.
The launchers only start processes; the store decides what is done.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository root: jobs import this code


@dataclass(frozen=True)
class Job:
    name: str  # the variant's name, or "shared-<variant>" for a job building stages variants share
    kind: str  # "variant" | "shared"
    args: tuple[str, ...]  # `python -m pipeline run` arguments (config, work dir, --set ..., --stages)
    python: str = sys.executable  # the interpreter the sweep runs under (on a cluster: on the shared filesystem)

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", "pipeline", "run", *self.args]

    def __str__(self) -> str:
        return shlex.join(self.command)


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
    return [line for line in log_text.replace("\r", "\n").splitlines() if line.startswith(prefixes) and "%|" not in line]


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log yet)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty)"
