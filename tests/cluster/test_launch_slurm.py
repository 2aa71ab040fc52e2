"""``cluster/launch.py`` on a real two-node SLURM: a job runs to the end; a preempted job requeues and resumes to
the same weights as an uninterrupted one.

Tolerance: across the two virtual nodes DeepSpeed reduces over gloo TCP, and the step during which SLURM's signal
lands comes out one float32 ulp different (seen: 1.2e-7 on a weight, 3e-8 on that step's loss); every other step
is bit-identical. On one node (tests/faults) resume is bit-exact. So weights must agree to 1e-6 here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.launch import main as launch
from cluster.slurm import sbatch_options
from tests.support.launch import TINY, launch_cmd, logged_steps
from tests.support.launch import run as run_local
from tests.support.slurm import SlurmCluster
from trainer.config import load_run_config
from trainer.rendezvous import JOB_PORTS, job_port
from trainer.resilience.ledger import read_ledger

# One SLURM per machine: with pytest-xdist, every test of the real SLURM runs in the same worker.
pytestmark = pytest.mark.xdist_group("slurm")

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
JOB = [
    *TINY, "--nodes", "2", "cluster.gpus_per_node=0", "cluster.cpu_ranks_per_node=1", "cluster.cpus_per_task=1",
    "cluster.partition=low", "cluster.time_min=10", "data.batch_size=4", f"schedule.max_steps={STEPS}",
    "checkpoint.every_steps=5",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _job_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Jobs inherit the submitting environment (sbatch --export=ALL).
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv(
        "TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    )
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _submit(run_dir: Path) -> str:
    assert launch(["--config", "demo_fcmae", "--run-dir", str(run_dir), *JOB]) == 0
    return (run_dir / "slurm" / "jobs.txt").read_text().split()[-1]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "fcmae.safetensors"))


def _job_log(run_dir: Path, job_id: str) -> str:
    files = sorted((run_dir / "slurm").rglob(f"{job_id}_*_log.*"))
    return "\n".join(p.read_text() for p in files if p.suffix in (".out", ".err"))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("slurm_uninterrupted")
    job_id = _submit(run_dir)
    state = slurm_cluster.wait_state(job_id, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], timeout=240)
    assert state == "COMPLETED", _job_log(run_dir, job_id) + slurm_cluster.log_tails()
    return run_dir


@pytest.mark.slow
def test_two_node_job_runs_to_the_end(slurm_cluster: SlurmCluster, uninterrupted: Path) -> None:
    assert [r["step"] for r in logged_steps(uninterrupted)] == list(range(1, STEPS + 1))
    assert (uninterrupted / "export" / "model.safetensors").exists()
    assert (uninterrupted / "mlflow_run_id").exists()
    # What --dry-run prints is what was submitted: every option of the plan is in the job's sbatch script.
    cfg = load_run_config(uninterrupted / "config.yaml")
    (script,) = (uninterrupted / "slurm").rglob("*_submission.sh")
    submitted = {line.removeprefix("#SBATCH ").strip() for line in script.read_text().splitlines()}
    assert set(sbatch_options(cfg)) <= submitted, sorted(set(sbatch_options(cfg)) - submitted)


@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes_to_the_same_weights(
    slurm_cluster: SlurmCluster, uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = _submit(tmp_path)
    out = capsys.readouterr().out
    assert f"submitted demo_fcmae as job {job_id}" in out and "squeue -j" in out and "mlflow ui" in out
    deadline = time.monotonic() + 240
    while len(logged_steps(tmp_path)) < 3:
        assert time.monotonic() < deadline, _job_log(tmp_path, job_id) + slurm_cluster.log_tails()
        assert slurm_cluster.job_state(job_id) not in ("FAILED", "CANCELLED"), _job_log(tmp_path, job_id)
        time.sleep(0.2)
    # A second submission on the run directory while the job trains is refused, naming the job (its lock).
    assert launch(["--config", "demo_fcmae", "--run-dir", str(tmp_path), *JOB]) == 2
    assert re.search(rf"in use by another run: SLURM job {job_id} rank 0 pid \d+", capsys.readouterr().err)
    # SLURM's early-warning signal, as --signal=USR2@120 delivers it before a time limit. The requeued attempt
    # takes over its own lock (the job finishing proves it).
    slurm_cluster.run(["scancel", "--signal=USR2", job_id], check=True)
    state = slurm_cluster.wait_state(job_id, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], timeout=300)
    assert state == "COMPLETED", _job_log(tmp_path, job_id) + slurm_cluster.log_tails()
    assert int(slurm_cluster.job_info(job_id).get("Restarts", "0")) >= 1
    assert [r["step"] for r in logged_steps(tmp_path)] == list(range(1, STEPS + 1))
    reference, resumed = _weights(uninterrupted), _weights(tmp_path)
    assert resumed.keys() == reference.keys()
    assert max(float((resumed[k] - reference[k]).abs().max()) for k in reference) < 1e-6
    reference_losses = [r["loss"] for r in logged_steps(uninterrupted)]
    assert [r["loss"] for r in logged_steps(tmp_path)] == pytest.approx(reference_losses, rel=1e-6)


@pytest.mark.slow
def test_a_failing_job_is_retried_a_bounded_number_of_times(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # A shard set whose manifest is damaged: the launch passes (a manifest is there), every job attempt fails on it.
    broken = tmp_path / "broken-shards"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    args = ["--config", "demo_fcmae", "--run-dir", str(tmp_path / "run"), *JOB, f"data.train_url={broken}"]
    assert launch([*args, "cluster.max_failure_retries=1"]) == 0
    job_id = (tmp_path / "run" / "slurm" / "jobs.txt").read_text().split()[-1]
    state = slurm_cluster.wait_state(job_id, ["FAILED", "COMPLETED", "CANCELLED"], timeout=240)
    log = _job_log(tmp_path / "run", job_id)
    assert state == "FAILED", log
    assert slurm_cluster.job_info(job_id).get("Restarts") == "1"
    assert "failure retry 1 of 1" in log and "failed after 1 failure retries" in log
    assert "not a valid shard manifest" in log and str(broken) in log  # the real error names the data


@pytest.mark.slow
def test_preemptions_do_not_use_up_failure_retries(
    slurm_cluster: SlurmCluster, fmnist_shards: str, tmp_path: Path
) -> None:
    """Preempted once, then failing mid-run (its shards deleted): the failure still gets its one retry, because
    requeues and failure retries are separate budgets; then the job ends FAILED, with every rank stopped."""
    data = tmp_path / "shards"
    shutil.copytree(fmnist_shards, data)
    run_dir = tmp_path / "run"
    # Several epochs: the next epoch reopens the shards (this one's readers may hold them open).
    args = ["--config", "demo_fcmae", "--run-dir", str(run_dir), *JOB, f"data.train_url={data}", "schedule.epochs=5",
            "schedule.max_steps=300", "cluster.max_failure_retries=1", "cluster.max_requeues=5"]  # fmt: skip
    assert launch(args) == 0
    job_id = (run_dir / "slurm" / "jobs.txt").read_text().split()[-1]

    def wait_steps(n: int) -> None:
        deadline = time.monotonic() + 240
        while len(logged_steps(run_dir)) < n:
            assert time.monotonic() < deadline, _job_log(run_dir, job_id) + slurm_cluster.log_tails()
            time.sleep(0.2)

    wait_steps(3)
    slurm_cluster.run(["scancel", "--signal=USR2", job_id], check=True)  # preempted once: requeue 1 of 5
    restarts = run_dir / "slurm" / "restarts.json"
    deadline = time.monotonic() + 240
    while not (restarts.exists() and json.loads(restarts.read_text()).get("preemption")):
        assert time.monotonic() < deadline, _job_log(run_dir, job_id)
        time.sleep(0.2)
    resumed_from = len(logged_steps(run_dir))
    wait_steps(resumed_from + 2)  # the requeued job trains again ...
    for shard in data.glob("*.tar"):
        shard.unlink()  # ... until its data disappears
    state = slurm_cluster.wait_state(job_id, ["FAILED", "COMPLETED", "CANCELLED"], timeout=300)
    log = _job_log(run_dir, job_id)
    assert state == "FAILED", log + slurm_cluster.log_tails()
    counts = json.loads(restarts.read_text())
    assert len(counts["preemption"]) == 1 and len(counts["failure"]) == 1, counts
    assert "failure retry 1 of 1" in log and "failed after 1 failure retries" in log
    assert int(slurm_cluster.job_info(job_id).get("Restarts", "0")) == 2


def test_without_slurm_the_launcher_says_so_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, no scontrol
    started = time.monotonic()
    code = launch(["--config", "huge_fcmae", "--nodes", "16", "--run-dir", str(tmp_path / "run")])
    assert code == 2 and time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert "no SLURM cluster here: sbatch is not installed" in err and "--local" in err and "--dry-run" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sbatch_without_a_controller_is_no_cluster(
    slurm_cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SLURM's commands installed but no controller answering (a login node with a broken config, or a laptop
    with the package): the launcher asks ``scontrol ping`` and refuses instead of submitting into the void."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(re.sub(r"SlurmctldPort=\d+", "SlurmctldPort=1", slurm_cluster.slurm_conf.read_text()))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    code = launch(["--config", "demo_fcmae", "--run-dir", str(tmp_path / "run"), *JOB])
    assert code == 2
    assert "scontrol ping" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_node_range_starts_on_the_nodes_there_are_and_keeps_the_steps(
    slurm_cluster: SlurmCluster, fmnist_shards: str, tmp_path: Path
) -> None:
    """``--nodes 1-2`` with n2 drained: SLURM starts the job on n1 alone, which accumulates 2 micro-batches to keep
    the global batch of 8; preempted after n2 is back, the job continues on both nodes. Every step trains the
    samples that an uninterrupted 2-rank run trains (the ledger), with the same global batch throughout."""
    steps = 12
    common = [f"data.train_url={fmnist_shards}", "data.num_workers=1", "tracking.sample_ledger=true",
              f"schedule.max_steps={steps}", "checkpoint.every_steps=1000"]  # fmt: skip
    reference = tmp_path / "reference"  # the same config on 2 local ranks: the canonical layout's own world
    assert run_local(launch_cmd(reference, *common, "data.batch_size=4", ranks=2)) == 0

    run_dir = tmp_path / "run"
    slurm_cluster.run(["scontrol", "update", "nodename=n2", "state=drain", "reason=node-range-test"], check=True)
    try:
        job = list(JOB)
        job[job.index("--nodes") + 1] = "1-2"
        assert launch(["--config", "demo_fcmae", "--run-dir", str(run_dir), *job, *common]) == 0
        job_id = (run_dir / "slurm" / "jobs.txt").read_text().split()[-1]
        deadline = time.monotonic() + 240
        while len(logged_steps(run_dir)) < 3:
            assert time.monotonic() < deadline, _job_log(run_dir, job_id) + slurm_cluster.log_tails()
            assert slurm_cluster.job_state(job_id) not in ("FAILED", "CANCELLED"), _job_log(run_dir, job_id)
            time.sleep(0.2)
        assert slurm_cluster.job_info(job_id)["NumNodes"] == "1"
    finally:
        slurm_cluster.run(["scontrol", "update", "nodename=n2", "state=resume"], check=True)
    slurm_cluster.run(["scancel", "--signal=USR2", job_id], check=True)
    state = slurm_cluster.wait_state(job_id, ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"], timeout=300)
    log = _job_log(run_dir, job_id)
    assert state == "COMPLETED", log + slurm_cluster.log_tails()
    assert slurm_cluster.job_info(job_id)["NumNodes"] == "2"  # the requeued attempt got both nodes
    assert "1 of 1-2 nodes: micro-batch 4 x accumulation 2 x 1 ranks = global batch 8, as configured" in log
    segments = [json.loads(line) for line in (run_dir / "segments.jsonl").read_text().splitlines()]
    assert [(s["world_size"], s["grad_accum"]) for s in segments] == [(1, 2), (2, 1)]
    assert json.loads((run_dir / "export" / "metrics.json").read_text())["world_sizes"] == [1, 2]

    ledger, expected = read_ledger(run_dir / "ledger"), read_ledger(reference / "ledger")
    assert list(ledger) == list(range(1, steps + 1))
    assert all(len(entry["keys"]) == 8 for entry in ledger.values())  # the global batch, on 1 node and on 2
    assert [sorted(e["keys"]) for e in ledger.values()] == [sorted(e["keys"]) for e in expected.values()]


def test_each_job_attempt_meets_on_its_own_port_below_the_ephemeral_range() -> None:
    """A job's tasks meet on the port of the attempt (job id and restart count): outside the range the kernel hands
    to outgoing connections (which could hold it on the first node: submitit's own choice can fall there), and a
    requeued attempt gets another one, so a port taken on the first node does not fail every retry."""
    low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert JOB_PORTS.stop <= low
    attempts = [f"{job}:{restart}" for job in range(1000, 1050) for restart in range(3)]
    ports = [job_port(attempt) for attempt in attempts]
    assert ports == [job_port(attempt) for attempt in attempts]  # every task of an attempt computes the same
    assert set(ports) <= set(JOB_PORTS)
    assert len(set(ports)) >= 145  # 150 attempts: a few may share a port by chance, not many
