"""`sweep --launcher local --jobs N`: N jobs at once on this machine, each its own process.

On GPUs each job gets one device (CUDA_VISIBLE_DEVICES) from a pool of N; on CPUs the cores are split,
cores // N torch threads per job. A thread pool of N only waits on the child processes; the phases
(shared stages, then variants) run one after the other.
"""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.core.errors import UserError
from pipeline.launchers import ROOT, Job, job_env


@dataclass
class Outcome:
    job: Job
    code: int  # the run's exit status
    seconds: float
    log: Path


def gpu_devices(run_device: str) -> list[str]:
    """The GPUs jobs may take, one each ([] on CPUs or with run.device = cpu). Asked of CUDA_VISIBLE_DEVICES
    or nvidia-smi, not torch: the engine does not import it."""
    if run_device == "cpu":
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return [str(i) for i, line in enumerate(l for l in listing.stdout.splitlines() if l.startswith("GPU "))]


def check_jobs(jobs: int, devices: list[str]) -> None:
    if jobs < 1:
        raise UserError(f"--jobs {jobs} must be at least 1 (the number of variants run at once).")
    if devices and jobs > len(devices):
        raise UserError(f"--jobs {jobs} is more than the {len(devices)} GPUs visible here ({','.join(devices)}); "
                        f"each job takes one GPU: use --jobs {len(devices)} or fewer (or run.device=cpu).")


def run_phases(phases: list[list[Job]], *, jobs: int, devices: list[str], log_dir: Path,
               log: Callable[[str], None] = print, on_start: Callable[[Job, Path, int], None] = lambda j, p, pid: None,
               on_done: Callable[[Outcome], None] = lambda o: None) -> list[Outcome]:
    """Run each phase's jobs, `jobs` at a time; a phase starts only when the previous one succeeded."""
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // jobs)
    free: queue.Queue[str] = queue.Queue()
    for device in devices[:jobs]:
        free.put(device)
    log_dir.mkdir(parents=True, exist_ok=True)

    def start(job: Job) -> Outcome:
        env = job_env(None if devices else threads)
        device = free.get() if devices else None
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        path = log_dir / f"{job.name}.log"
        began = time.perf_counter()
        try:
            with open(path, "w") as out:
                out.write(f"$ {job}\n")
                out.flush()
                child = subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                on_start(job, path, child.pid)
                code = child.wait()
        finally:
            if device is not None:
                free.put(device)
        outcome = Outcome(job, code, time.perf_counter() - began, path)
        on_done(outcome)
        return outcome

    where = f"one GPU each ({','.join(devices[:jobs])})" if devices else f"{threads} torch threads each of {cores} cores"
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for phase in phases:
            if not phase:
                continue
            log(f"starting {len(phase)} {phase[0].kind} job(s), {min(jobs, len(phase))} at a time, {where}")
            done = list(pool.map(start, phase))
            outcomes.extend(done)
            if any(o.code != 0 for o in done):
                break  # the next phase needs this one's stages
    return outcomes
