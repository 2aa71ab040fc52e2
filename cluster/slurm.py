"""SLURM submission through submitit, and the job that runs in every task.

One task per GPU (per CPU rank on CPU clusters). The job takes its distributed environment from SLURM through
submitit (master address = first node, port derived from the job id). Preemption and the time limit reach the
training loop as SIGUSR2/SIGTERM, which only set a flag (trainer.resilience.preemption); all ranks save at the next step
boundary and exit with REQUEUE_EXIT_CODE; then global rank 0 requeues the job (``scontrol requeue``) with the
same run directory, so it resumes by itself. A job that finished is not requeued. A job that failed with a real
error is requeued at most ``cluster.max_failure_retries`` times (transient node or network faults), then the
failure stands. The two budgets are counted apart (``slurm/restarts.json``): preemptions never use up failure
retries, nor failures requeues. One failed task ends the whole job step (``srun --kill-on-bad-exit=1``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from trainer.config import TrainConfig
from trainer.export import atomic_write_text
from trainer.resilience.preemption import REQUEUE_EXIT_CODE
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)


RESTARTS_FILE = "restarts.json"
"""In ``<run_dir>/slurm/``: the attempts that ended in a requeue, by cause, so each cause has its own budget."""


def _attempt() -> str:
    """This attempt of the job: job id and SLURM's restart count (the same for every task of the attempt)."""
    from trainer.resilience.run_lock import slurm_job_id

    return f"{slurm_job_id() or 'local'}:{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def distributed_env() -> Any:
    """In a task of the job: torch's ``env://`` variables exported from SLURM's (submitit's
    ``TorchDistributedEnvironment``), with the port of this attempt (:func:`trainer.rendezvous.job_port`) unless
    the user set ``MASTER_PORT``. They replace any the submitting shell passed on (a job started from another
    job's shell inherits its ``RANK``, ``WORLD_SIZE``...: SLURM's are this task's)."""
    import submitit

    from trainer.rendezvous import job_port

    dist = submitit.helpers.TorchDistributedEnvironment()
    if "MASTER_PORT" not in os.environ:
        dist.master_port = job_port(_attempt())
    return dist.export(set_cuda_visible_devices=False, overwrite=True)


def claim_restart(run_dir: Path, cause: str, limit: int) -> tuple[int, bool]:
    """The attempts of this run requeued for ``cause`` (``"preemption"`` or ``"failure"``) before this one, and
    whether this one may requeue too (fewer than ``limit`` before it); if so it is recorded, once however many
    ranks claim it. Locked: ranks of several nodes may claim at once on the shared file system."""
    path = RunDir(run_dir).slurm / RESTARTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data: dict[str, list[str]] = json.loads(path.read_text()) if path.exists() else {}
        attempts = data.setdefault(cause, [])
        before = len([a for a in attempts if a != _attempt()])
        allowed = before < limit
        if allowed and _attempt() not in attempts:
            attempts.append(_attempt())
            atomic_write_text(path, json.dumps(data, indent=1))
        return before, allowed


JOBS_FILE = "jobs.txt"
"""In ``<run_dir>/slurm/``: the job ids submitted for the run directory, newest last."""
_LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT")  # fmt: skip


def check_no_job_queued(run_dir: Path) -> None:
    """:class:`~trainer.resilience.run_lock.RunDirLocked` when the newest job submitted for ``run_dir`` is still
    queued or running (a second submission would train beside it once both start)."""
    from trainer.resilience.run_lock import RunDirLocked

    jobs = RunDir(run_dir).slurm / JOBS_FILE
    if not jobs.is_file() or not jobs.read_text().split():
        return
    job = jobs.read_text().split()[-1]
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return
    state = out.stdout.strip().split("\n")[0].strip()
    if out.returncode == 0 and state in _LIVE_STATES:
        raise RunDirLocked(
            f"{run_dir} belongs to SLURM job {job}, which is {state}: wait for it, `scancel {job}`, or pass "
            "another --run-dir"
        )


def _requeue(job_id: str) -> None:
    """Put the job back in the queue; a job SLURM already requeued (partition preemption) is left as it is."""
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("scontrol requeue %s: %s (SLURM may have requeued it already)", job_id, result.stderr.strip())


class TrainJob:
    """The callable submitit pickles and runs in every task of the job (and again after each requeue)."""

    def __init__(self, run_dir: str, max_requeues: int, max_failure_retries: int) -> None:
        self.run_dir = run_dir
        self.max_requeues = max_requeues
        self.max_failure_retries = max_failure_retries

    def __call__(self) -> int:
        import submitit

        from trainer.resilience.failure import FAILURE_EXIT_CODE, hard_exit, record_exception
        from trainer.resilience.run_lock import RunDirLocked, RunLock
        from trainer.worker import run_run_dir, setup_logging

        dist_env = distributed_env()
        setup_logging(dist_env.rank)
        job_id = submitit.JobEnvironment().job_id
        run_dir = Path(self.run_dir)
        lock = RunLock(run_dir, role="rank 0") if dist_env.rank == 0 else None
        try:
            if lock is not None:  # a requeued attempt takes over its predecessor's lock (the same job id)
                lock.acquire()
            code = run_run_dir(run_dir)
        except RunDirLocked as err:  # another run has the directory: retrying cannot help
            record_exception(run_dir, dist_env.rank, err)
            hard_exit(FAILURE_EXIT_CODE)
            raise  # unreachable
        except BaseException as err:  # every error ends the task, with or without a retry
            record_exception(run_dir, dist_env.rank, err)
            # Any failing rank may requeue (one attempt counts once, a second request is harmless); the others
            # may be blocked in a collective: srun's --kill-on-bad-exit ends them when this task exits.
            retries, allowed = claim_restart(run_dir, "failure", self.max_failure_retries)
            if allowed:
                log.error("rank %d failed; requeueing job %s (failure retry %d of %d)",
                          dist_env.rank, job_id, retries + 1, self.max_failure_retries)  # fmt: skip
                _requeue(job_id)
                self._wait_for_requeue()
            log.error("job %s failed after %d failure retries (cluster.max_failure_retries); not requeueing",
                      job_id, retries)  # fmt: skip
            hard_exit(FAILURE_EXIT_CODE)
        if code != REQUEUE_EXIT_CODE:
            if lock is not None:
                lock.release()
            return code
        # Requeued (or failed): the lock stays, and the job's next attempt takes it over.
        if dist_env.rank == 0:
            requeues, allowed = claim_restart(run_dir, "preemption", self.max_requeues)
            if not allowed:
                raise RuntimeError(
                    f"job {job_id} was preempted/timed out {requeues} times (cluster.max_requeues="
                    f"{self.max_requeues}); not requeueing. Resume by re-running the launch command."
                )
            log.warning("checkpoint saved; requeueing job %s (requeue %d of %d)", job_id, requeues + 1,
                        self.max_requeues)  # fmt: skip
            _requeue(job_id)
        self._wait_for_requeue()
        return code

    @staticmethod
    def _wait_for_requeue(timeout_s: float = 600) -> None:
        """Wait to be stopped by SLURM's requeue. Returning would let submitit record a result (the job would look
        finished); exiting early could end the job step before rank 0's requeue lands."""
        time.sleep(timeout_s)
        sys.exit(REQUEUE_EXIT_CODE)


def slurm_parameters(cfg: TrainConfig, after_job: str | None = None) -> dict[str, Any]:
    """The job's SLURM resources, in submitit's parameter names: the one source of what is submitted and of what
    ``--dry-run`` prints (:func:`sbatch_options`). ``after_job``: a chained stage starts once that job succeeded."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "name": cfg.name,
        "nodes": c.nodes,
        "tasks_per_node": c.ranks_per_node,
        "cpus_per_task": c.cpus_per_task,
        "timeout_min": c.time_min,
        "slurm_signal_delay_s": c.signal_delay_s,
        "slurm_additional_parameters": {"requeue": True},
        # One failed task ends the job step (and so every rank) instead of leaving the others in a collective.
        "slurm_srun_args": ["--kill-on-bad-exit=1"],
    }
    if c.gpus_per_node:
        params["gpus_per_node"] = c.gpus_per_node
    if c.partition:
        params["slurm_partition"] = c.partition
    if c.account:
        params["slurm_account"] = c.account
    if c.mem_gb:
        params["mem_gb"] = c.mem_gb
    if c.min_nodes is not None and c.min_nodes < c.nodes:
        # A node range: SLURM allocates as many nodes of MIN-MAX as it can start on, unless the job fixes its task
        # count, which a per-node task count in the allocation does (then it gets MIN, seen on SLURM 22.05 with
        # select/cons_tres). So the allocation asks for nodes and the CPUs of a node's ranks (--mincpus), and srun
        # starts the ranks on every node it got. submitit's own `nodes` stays an int; its additional parameters
        # replace the #SBATCH line it writes for the same key.
        del params["tasks_per_node"]
        params["slurm_additional_parameters"]["nodes"] = f"{c.min_nodes}-{c.nodes}"
        params["slurm_additional_parameters"]["mincpus"] = c.ranks_per_node * c.cpus_per_task
        params["slurm_srun_args"] += [f"--ntasks-per-node={c.ranks_per_node}", f"--cpus-per-task={c.cpus_per_task}"]
    if after_job is not None:
        params["slurm_additional_parameters"]["dependency"] = f"afterok:{after_job}"
    return params


# submitit parameter -> the sbatch option it writes
_SBATCH_NAMES = {
    "name": "job-name", "nodes": "nodes", "tasks_per_node": "ntasks-per-node", "cpus_per_task": "cpus-per-task",
    "timeout_min": "time", "gpus_per_node": "gpus-per-node", "slurm_partition": "partition",
    "slurm_account": "account",
}  # fmt: skip


def sbatch_options(cfg: TrainConfig) -> list[str]:
    """The ``#SBATCH`` options submitit writes for :func:`slurm_parameters` (with its own ``--open-mode=append``)."""
    params = slurm_parameters(cfg)
    extra = params["slurm_additional_parameters"]
    options = [
        f"--{_SBATCH_NAMES[key]}={value}" for key, value in params.items() if key in _SBATCH_NAMES and key not in extra
    ]
    if "mem_gb" in params:
        options.append(f"--mem={params['mem_gb']}G")
    options.append(f"--signal=USR2@{params['slurm_signal_delay_s']}")
    options += [f"--{k}" if v is True else f"--{k}={v}" for k, v in extra.items()]
    return [*options, "--open-mode=append"]


def submit(cfg: TrainConfig, run_dir: Path, after_job: str | None = None) -> Any:
    """Submit the run directory's job (a chained stage: once ``after_job`` succeeded) and record its id in
    ``slurm/jobs.txt`` (newest last: what :func:`check_no_job_queued` reads); returns the submitit job."""
    import submitit

    executor = submitit.AutoExecutor(folder=RunDir(run_dir).slurm / "%j", cluster="slurm")
    executor.update_parameters(**slurm_parameters(cfg, after_job))
    job = executor.submit(TrainJob(str(run_dir), cfg.cluster.max_requeues, cfg.cluster.max_failure_retries))
    with open(RunDir(run_dir).slurm / JOBS_FILE, "a") as f:
        f.write(f"{job.job_id}\n")
    return job
