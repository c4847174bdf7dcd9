"""`--launcher slurm`: jobs as SLURM job arrays through submitit.

Each `submit` is one array; dependencies are afterok (a failed dependency cancels the dependants). A
sweep submits the stages variants share as one array and the variants as another after it; a sharded
stage its shard jobs as one array. Every task runs the ordinary `python -m pipeline run`.
On a time-out or preemption SLURM signals the job, submitit calls `RunJob.checkpoint`
(the run is stopped; its stage keeps its last checkpoint in the store's partial dir) and requeues it;
the requeued `run` resumes from that checkpoint. A job over several tasks (nodes x tasks_per_node)
exports MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from SLURM's environment, the variables
torchrun sets, so training takes the same distributed path as under torchrun.

Job state comes from squeue (kept there MinJobAge after the end) and submitit's result files; sacct is
not needed, so a cluster without accounting works too.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.launchers.base import ROOT, Job, JobState, Launcher, Submitted, job_env

INSTALL = "pip install 'rst-mart[slurm]' (or: pip install submitit==1.5.4)"
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
          "GONE"}  # GONE: neither squeue nor submitit knows the job
POLL_S = 2.0  # seconds between squeue calls while waiting: the scheduler has no push notification
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SUSPENDED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "STOPPED"}


def require_slurm():
    """submitit, imported; a UserError (exit 2) naming the install command when it or sbatch is missing."""
    try:
        import submitit
    except ImportError:
        raise UserError(f"--launcher slurm needs submitit, which is not installed; install it with "
                        f"{INSTALL}.") from None
    if shutil.which("sbatch") is None:
        raise UserError("--launcher slurm needs SLURM's sbatch, which is not on PATH; run it on a SLURM "
                        "login node, or for a one-node test cluster on this machine run (as root) "
                        "bash scripts/slurm_local.sh (it installs slurm-wlm and munge).")
    return submitit


def sbatch_options(options: list[str]) -> dict:
    """["--qos=high", "--exclusive"] -> {"qos": "high", "exclusive": True} (submitit's additional_parameters)."""
    parsed = {}
    for option in options:
        key, sep, value = option.lstrip("-").partition("=")
        if not option.startswith("--") or not key:
            raise UserError(f"launcher.sbatch option {option!r} must be a long sbatch option, --name or "
                            f"--name=value (for example --qos=high).")
        parsed[key.replace("-", "_")] = value if sep else True
    return parsed


def master_port(job_id: str) -> int:
    """The rendezvous port every task of job `job_id` derives alike. submitit's own pick (20000-60000) falls
    in Linux's ephemeral range (32768-60999) three times in four, where any outgoing connection on the
    node may hold it: rank 0 then cannot bind and the other ranks wait for it. Below that range, no
    connection is handed the port by the kernel."""
    return 20000 + int(job_id) % 12000


class RunJob:
    """The callable submitit pickles: runs `job` as a subprocess and is checkpointable (requeued on time-out)."""

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None

    def __call__(self, job: Job) -> int:
        import submitit

        tasks = int(os.environ.get("SLURM_NTASKS", "1"))
        if tasks > 1:
            # The rendezvous torchrun would give: rank 0's host and a port derived from the job id.
            # Every task sees all of its node's GPUs; LOCAL_RANK picks one (pipeline.core.distributed).
            rendezvous = submitit.helpers.TorchDistributedEnvironment()
            rendezvous.master_port = master_port(os.environ["SLURM_JOB_ID"])
            rendezvous.export(set_cuda_visible_devices=False)
        threads = os.environ.get("SLURM_CPUS_PER_TASK")
        self._child = subprocess.Popen(job.command, cwd=job.cwd, env=job_env(int(threads) if threads else None))
        code = self._child.wait()
        if code != 0:
            raise RuntimeError(f"`{job}` exited with status {code}")
        return code

    def checkpoint(self, job: Job):
        import submitit

        # The run's stage saves its state every run.checkpoint_every_s into the store's partial dir,
        # written atomically, so stopping it anywhere loses at most that interval (SIGTERM, not SIGINT:
        # a batch script starts its steps with SIGINT ignored). Then a fresh RunJob is requeued.
        child = self._child
        if child is not None and child.returncode is None:
            child.send_signal(signal.SIGTERM)
            # This runs inside a signal handler that interrupted __call__'s child.wait(), which holds the
            # Popen's wait lock: look without reaping (WNOWAIT) instead of a second wait().
            deadline = time.monotonic() + 30
            while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                if time.monotonic() > deadline:
                    child.kill()
                    break
                time.sleep(0.05)
        return submitit.helpers.DelayedSubmission(RunJob(), job)

    def __getstate__(self) -> dict:
        return {}  # the child process is this attempt's, not something to resubmit

    def __setstate__(self, state: dict) -> None:
        self._child = None


def make_executor(folder: Path, launcher, *, name: str):
    submitit = require_slurm()
    if launcher.nodes < 1 or launcher.tasks_per_node < 1 or launcher.time_min < 1:
        raise UserError(f"launcher.nodes, launcher.tasks_per_node and launcher.time_min must be at least 1 "
                        f"(got {launcher.nodes}, {launcher.tasks_per_node}, {launcher.time_min}); set them in "
                        f"[launcher] or with --nodes/--tasks-per-node/--time.")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=launcher.max_requeues)
    params = {"job_name": name, "time": launcher.time_min, "nodes": launcher.nodes,
              "ntasks_per_node": launcher.tasks_per_node, "signal_delay_s": 60,
              # A task that fails (a rank that could not start its process group) ends the job's
              # other tasks, which would otherwise wait for it until the time limit.
              "srun_args": ["--kill-on-bad-exit=1"],
              "additional_parameters": sbatch_options(launcher.sbatch),
              # submitit unpickles RunJob in the job: this worktree's code must be importable there.
              "setup": [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]}
    if launcher.partition:
        params["partition"] = launcher.partition
    if launcher.gpus_per_node:
        params["gpus_per_node"] = launcher.gpus_per_node
    if launcher.cpus_per_task:
        params["cpus_per_task"] = launcher.cpus_per_task
    if launcher.mem_gb:
        params["mem"] = f"{launcher.mem_gb}G"
    executor.update_parameters(**params)
    return executor


def submit(executor, jobs: list[Job], *, after: str | None = None) -> list[str]:
    """Submit `jobs` as one array (after the array `after` succeeded); their SLURM ids ("123_0", ...)."""
    if not jobs:
        return []
    extra = dict(executor.parameters.get("additional_parameters") or {})
    if after:
        extra.update(dependency=f"afterok:{after}", kill_on_invalid_dep="yes")
    else:
        extra.pop("dependency", None)
        extra.pop("kill_on_invalid_dep", None)
    executor.update_parameters(additional_parameters=extra)
    submitted = executor.map_array(RunJob(), jobs)
    return [job.job_id for job in submitted]


def array_id(job_id: str) -> str:
    return job_id.split("_")[0]


def states(job_ids: list[str], folder: Path) -> dict[str, str]:
    """Each job's SLURM state (squeue), else DONE/ERROR from submitit's result file, else GONE."""
    found: dict[str, str] = {}
    arrays = sorted({array_id(j) for j in job_ids})
    if arrays and shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(arrays)],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            job_id, _, state = line.strip().partition("|")
            found[job_id] = state
    result = {}
    for job_id in job_ids:
        if job_id in found:
            result[job_id] = found[job_id]
            continue
        pickle = folder / f"{job_id}_0_result.pkl"
        result[job_id] = "ENDED" if pickle.exists() else "GONE"
    return result


def log_paths(folder: Path, job_id: str) -> tuple[Path, Path]:
    """(stdout, stderr) of the job's first task: submitit's file names."""
    return folder / f"{job_id}_0_log.out", folder / f"{job_id}_0_log.err"


class SlurmLauncher(Launcher):
    """Jobs as SLURM arrays. The cluster's state is the record: a later launch adopts what is still queued,
    and `states` works from any process (squeue, then submitit's result files)."""

    name = "slurm"
    detaches = True

    def __init__(self, settings, **kwargs):
        super().__init__(settings, **kwargs)
        self.slurm_folder = (self.folder / "slurm").resolve()
        self._executor = None

    @property
    def world_size(self) -> int:
        return self.settings.nodes * self.settings.tasks_per_node

    def check(self) -> None:
        require_slurm()

    def settings_record(self) -> dict:
        return {"folder": str(self.slurm_folder), "world_size": self.world_size}

    def adopt(self, previous: dict[str, Submitted]) -> dict[str, Submitted]:
        known = {name: one for name, one in previous.items() if "job_id" in one.info}
        live = states([one.info["job_id"] for one in known.values()], self.slurm_folder) if known else {}
        adopted = {name: one for name, one in known.items() if live[one.info["job_id"]] in ACTIVE}
        for name, one in sorted(adopted.items()):
            self.log(f"{name}: still {live[one.info['job_id']]} as job {one.info['job_id']}; not submitted again")
        return adopted

    def submit(self, jobs: list[Job], *, after: list[Submitted] = ()) -> list[Submitted]:
        if not jobs:
            return []
        if self._executor is None:
            self._executor = make_executor(self.slurm_folder, self.settings, name=f"rst-mart-{self.folder.name}")
        arrays = ":".join(sorted({array_id(one.info["job_id"]) for one in after}))
        submitted = []
        for job, job_id in zip(jobs, submit(self._executor, jobs, after=arrays or None)):
            submitted.append(Submitted(job.name, job.kind, {"job_id": job_id, "command": str(job)}))
            self.log(f"{job.name}: submitted as job {job_id}" + (f" (after {arrays})" if arrays else ""))
        return submitted

    def states(self, submitted: list[Submitted]) -> dict[str, JobState]:
        now = states([one.info["job_id"] for one in submitted], self.slurm_folder)
        return {one.name: self._state(now[one.info["job_id"]], one.info["job_id"]) for one in submitted}

    @staticmethod
    def _state(state: str, job_id: str) -> JobState:
        # ENDED (squeue has forgotten it, submitit left a result) is neither: the store tells what it did.
        return JobState(f"{state} (job {job_id})", active=state in ACTIVE, succeeded=state == "COMPLETED",
                        failed=state in FAILED, started=state != "PENDING")

    def wait(self, submitted, *, on_change=lambda s, state: None) -> dict[str, JobState]:
        told: dict[str, str] = {}
        while True:
            now = self.states(submitted)
            for one in submitted:
                if now[one.name].text != told.get(one.name):
                    told[one.name] = now[one.name].text
                    on_change(one, now[one.name])
            if not any(state.active for state in now.values()):
                return now
            time.sleep(POLL_S)

    def logs(self, submitted: Submitted) -> list[Path]:
        return list(log_paths(self.slurm_folder, submitted.info["job_id"]))

    def describe(self, submitted: Submitted, state: JobState) -> str:
        out, err = self.logs(submitted)
        return f"job {submitted.info['job_id']} {state.text.split(' (')[0]}; its logs are {out} and {err}"
