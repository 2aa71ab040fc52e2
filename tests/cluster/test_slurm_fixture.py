"""The local SLURM fixture behaves like a real cluster: multi-node steps, accounting, submitit, preemption."""

from __future__ import annotations

from pathlib import Path

import pytest
import submitit

from tests.support.slurm import SlurmCluster
from trainer.rendezvous import JOB_PORTS

# One SLURM per machine: with pytest-xdist, every test of the real SLURM runs in the same worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]


def test_srun_runs_one_task_on_each_node(slurm_cluster: SlurmCluster) -> None:
    proc = slurm_cluster.run(["srun", "-N2", "-n2", "-l", "sh", "-c", "hostname; echo $SLURMD_NODENAME"], check=True)
    lines = sorted(proc.stdout.splitlines())
    # `-l` prefixes "rank: "; each rank prints the machine's hostname, then its virtual node's name.
    node_names = {line.split(": ", 1)[1] for line in lines if line.split(": ", 1)[1] in slurm_cluster.nodes}
    assert node_names == {"n1", "n2"}, proc.stdout
    assert len(lines) == 4, proc.stdout


def test_sacct_reports_finished_job_as_completed(slurm_cluster: SlurmCluster) -> None:
    job_id = slurm_cluster.sbatch("-o", "/dev/null", "--wrap", "true")
    assert slurm_cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30) == "COMPLETED"
    acct = slurm_cluster.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"], check=True)
    assert acct.stdout.strip() == f"{job_id}|COMPLETED|0:0"


def test_submitit_job_returns_result(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    def describe(x: int) -> tuple[int, str]:
        import os  # runs in the job: nested functions are pickled by value, so imports go inside

        return x * 2, os.environ["SLURM_JOB_PARTITION"]

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(slurm_partition="low", nodes=1, tasks_per_node=1, timeout_min=5)
    job = executor.submit(describe, 21)
    assert executor.cluster == "slurm"
    assert job.result() == (42, "low")
    # submitit reads the state through sacct, which only works with accounting (slurmdbd) configured.
    slurm_cluster.wait_state(job.job_id, "COMPLETED", timeout=30)
    assert job.get_info(mode="force")["State"] == "COMPLETED"


def test_submitit_two_node_job_rendezvous_on_master_addr(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    def rendezvous() -> dict[str, str | int]:
        """What torch's env:// init does: rank 0 listens on MASTER_ADDR:MASTER_PORT, the other rank connects (the
        variables as a training job's tasks export them)."""
        import os
        import socket
        import time

        from cluster.slurm import distributed_env

        dist = distributed_env()
        if dist.rank == 0:
            with socket.create_server(("", dist.master_port)) as server:
                server.settimeout(60)
                conn, _ = server.accept()
                with conn:
                    message = conn.recv(64).decode()
        else:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with socket.create_connection((dist.master_addr, dist.master_port), timeout=5) as conn:
                        conn.sendall(f"hello from rank {dist.rank}".encode())
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            message = "sent"
        return {
            "rank": dist.rank,
            "world_size": dist.world_size,
            "node": os.environ["SLURMD_NODENAME"],
            "master_addr": dist.master_addr,
            "master_port": dist.master_port,
            "message": message,
        }

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(slurm_partition="low", nodes=2, tasks_per_node=1, timeout_min=5)
    results = executor.submit(rendezvous).results()
    assert [r["rank"] for r in results] == [0, 1]
    assert {r["node"] for r in results} == {"n1", "n2"}
    assert all(r["world_size"] == 2 and r["master_addr"] == "n1" for r in results)
    assert results[0]["master_port"] == results[1]["master_port"] in JOB_PORTS
    assert results[0]["message"] == "hello from rank 1"


def test_high_partition_job_preempts_and_requeues_low_job(slurm_cluster: SlurmCluster) -> None:
    slurm_cluster.wait_idle(timeout=30)
    low = slurm_cluster.sbatch(
        "--requeue", "-p", "low", "-N2", f"--ntasks-per-node={slurm_cluster.cpus_per_node}", "-o", "/dev/null",
        "--wrap", "sleep 300",
    )  # fmt: skip
    try:
        slurm_cluster.wait_state(low, "RUNNING", timeout=30)
        high = slurm_cluster.sbatch("-p", "high", "-N1", "-n1", "-o", "/dev/null", "--wrap", "true")
        # The low job occupies every CPU, so the high job can only run once the low job was preempted.
        slurm_cluster.wait_state(low, {"PENDING", "REQUEUED", "PREEMPTED"}, timeout=30)
        assert slurm_cluster.wait_state(high, {"COMPLETED", "FAILED"}, timeout=30) == "COMPLETED"
        # Requeued jobs start again once their old credential expired (AuthInfo=cred_expire=10).
        slurm_cluster.wait_state(low, "RUNNING", timeout=60)
        info = slurm_cluster.job_info(low)
        assert int(info["Restarts"]) >= 1, info
        assert info["JobState"] == "RUNNING", info
    finally:
        slurm_cluster.run(["scancel", low])
    slurm_cluster.wait_idle(timeout=30)
