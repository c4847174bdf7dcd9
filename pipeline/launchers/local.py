"""`--launcher local --jobs N`: N jobs at once on this machine, each its own process; `serial`: one.

On GPUs each job gets one device (CUDA_VISIBLE_DEVICES) from a pool of N; on CPUs the cores are split,
cores // N torch threads per job. A thread pool of N only waits on the child processes, and tells the
waiting caller of every change through a queue, so the caller's callbacks run in its own thread.
"""
from __future__ import annotations

import os
import queue
import shutil
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.launchers.base import Job, JobState, Launcher, Submitted, job_env


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
    gpus = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
    return [str(i) for i in range(len(gpus))]


class LocalLauncher(Launcher):
    name = "local"

    def __init__(self, settings, **kwargs):
        super().__init__(settings, **kwargs)
        self.log_dir = self.folder / "logs"
        self.devices: list[str] = []
        self._pool: ThreadPoolExecutor | None = None
        self._free: queue.Queue[str] = queue.Queue()
        self._changes: queue.Queue[Submitted] = queue.Queue()
        self._futures: dict[str, Future] = {}
        self._told: dict[str, str] = {}  # the last state `wait` reported of each job
        self._ended: set[str] = set()  # jobs whose end `wait` has reported

    def check(self) -> None:
        self.devices = gpu_devices(self.run_device)
        if self.jobs < 1:
            raise UserError(f"--jobs {self.jobs} must be at least 1 (the number of jobs run at once).")
        if self.devices and self.jobs > len(self.devices):
            raise UserError(f"--jobs {self.jobs} is more than the {len(self.devices)} GPUs visible here "
                            f"({','.join(self.devices)}); each job takes one GPU: use --jobs {len(self.devices)} "
                            f"or fewer (or run.device=cpu).")

    def submit(self, jobs: list[Job], *, after: list[Submitted] = ()) -> list[Submitted]:
        if not jobs:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.jobs)
            for device in self.devices[:self.jobs]:
                self._free.put(device)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cores = len(os.sched_getaffinity(0))
        threads = max(1, cores // self.jobs)
        where = (f"one GPU each ({','.join(self.devices[:self.jobs])})" if self.devices
                 else f"{threads} torch threads each of {cores} cores")
        self.log(f"starting {len(jobs)} {jobs[0].kind} job(s), {min(self.jobs, len(jobs))} at a time, {where}")
        needed = [self._futures[s.name] for s in after]
        submitted = []
        for job in jobs:
            log = str(self.log_dir / f"{job.name}.log")
            one = Submitted(job.name, job.kind, {"exit": None, "pid": None, "log": log})
            # Jobs run in submission order and dependencies are submitted first, so a job waiting on its
            # dependencies never holds a worker a dependency still needs.
            self._futures[job.name] = self._pool.submit(self._run, job, one, needed, threads)
            submitted.append(one)
        return submitted

    def _run(self, job: Job, one: Submitted, needed: list[Future], threads: int) -> int | None:
        if any(f.exception() is not None or f.result() != 0 for f in needed):  # blocks until each has ended
            one.info["skipped"] = True
            self._changes.put(one)
            return None
        env = job_env(None if self.devices else threads)
        device = self._free.get() if self.devices else None
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        began = time.perf_counter()
        code = None
        try:
            with open(one.info["log"], "w") as out:
                out.write(f"$ {job}\n")
                out.flush()
                child = subprocess.Popen(job.command, cwd=job.cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
                one.info["pid"] = child.pid
                self._changes.put(one)
                code = child.wait()
        finally:
            if device is not None:
                self._free.put(device)
            # Recorded even if starting failed, so that a waiting caller is not left waiting.
            one.info.update(exit=code if code is not None else -1, seconds=round(time.perf_counter() - began, 1))
            self._changes.put(one)
        return code

    def states(self, submitted: list[Submitted]) -> dict[str, JobState]:
        return {one.name: self._state(one) for one in submitted}

    def _state(self, one: Submitted) -> JobState:
        info = one.info
        log = info.get("log")
        if info.get("skipped"):
            return JobState("not started (a job it needs failed)", active=False, started=False)
        if info.get("exit") is not None:
            code = info["exit"]
            took = f" in {info['seconds']}s" if "seconds" in info else ""
            text = (f"exit 0{took}, log {log}" if code == 0 else f"FAILED (exit {code}){took}, log {log}")
            return JobState(text, active=False, succeeded=code == 0, failed=code != 0, exit_code=code)
        mine = self._futures.get(one.name)
        if mine is not None and not mine.done():  # started by this process: queued or running now
            if info.get("pid") is None:
                return JobState("queued", active=True, started=False)
            return JobState(f"running (pid {info['pid']}, log {log})", active=True)
        if info.get("pid") is None:  # recorded by a launch that ended before it started
            return JobState("not started", active=False, started=False)
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:  # the launch that started it was killed: rerun it to resume
            return JobState(f"interrupted (log {log})", active=False)
        return JobState(f"running (pid {info['pid']}, log {log})", active=True)

    def wait(self, submitted, *, on_change=lambda s, state: None) -> dict[str, JobState]:
        names = {one.name for one in submitted}
        waiting = {name for name in names if name in self._futures and name not in self._ended}
        while waiting:
            changed = self._changes.get()  # put by the pool's threads at each start and end
            state = self._state(changed)
            # Only the jobs asked about are reported, each state once (a start seen after the end is not news).
            if changed.name in names and self._told.get(changed.name) != state.text:
                self._told[changed.name] = state.text
                on_change(changed, state)
            if not state.active:
                self._ended.add(changed.name)
                waiting.discard(changed.name)
        return self.states(submitted)

    def logs(self, submitted: Submitted) -> list[Path]:
        return [Path(submitted.info["log"])]

    def describe(self, submitted: Submitted, state: JobState) -> str:
        if not state.started:
            return "not started, because a job it needs failed"
        code = submitted.info.get("exit")
        how = f"exit {code}" if code is not None else state.text.split(" (")[0]
        return f"{how}; its log is {submitted.info['log']}"


class SerialLauncher(LocalLauncher):
    """The default: callers work in their own process, one thing after another, as without a launcher.
    Jobs it is given run as one local process at a time."""

    name = "serial"
    in_process = True

    def check(self) -> None:
        # No GPU listing (nvidia-smi) here: every plain `run` checks its launcher, and one job at a time
        # needs no device of its own.
        if self.jobs != 1:
            raise UserError(f"--jobs {self.jobs} runs that many jobs at once, which the serial launcher does not "
                            f"(it works in this process); add --launcher local (or drop --jobs).")
