"""Running the real launcher in tests: the tiny settings, in-process and as a subprocess, and what a run logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# A tiny run of any stage: 64-px synthetic images, fp32, logging every step, no evaluation or checkpoint on a step
# count (tests set the step cap).
TINY_ANY_STAGE = [
    "data.train_url=synthetic://512",
    "data.image_size=64",
    "data.num_workers=0",
    "deepspeed.precision=fp32",
    "tracking.log_every=1",
    "eval.every_steps=1000",
    "checkpoint.every_steps=1000",
]
TINY = [*TINY_ANY_STAGE, "model.decoder_dim=64", "data.val_url=null", "eval.knn_bank_url=null"]
"""A tiny FCMAE run: the above with a narrow decoder and without the demo's kNN probe (tests that want it set it)."""


def launch(run_dir: Path, *overrides: str, ranks: int = 1, config: str = "demo_fcmae") -> int:
    """Run ``cluster/launch.py --local`` in this process with the tiny settings; returns its exit code."""
    from cluster.launch import main as launch_main
    from trainer.config import load_config

    tiny = TINY if load_config(config).stage == "pretrain" else TINY_ANY_STAGE
    args = ["--config", config, "--local", "--run-dir", str(run_dir), *tiny, f"cluster.cpu_ranks_per_node={ranks}"]
    return launch_main([*args, *overrides])


def launch_cmd(run_dir: Path, *overrides: str, ranks: int = 1, config: str = "demo_fcmae") -> list[str]:
    """The command a user types, with the tiny test settings."""
    tiny = TINY if config == "demo_fcmae" else TINY_ANY_STAGE
    return [
        sys.executable, str(REPO / "cluster" / "launch.py"), "--config", config, "--local", "--run-dir",
        str(run_dir), *tiny, f"cluster.cpu_ranks_per_node={ranks}", *overrides,
    ]  # fmt: skip


def env(fault: str | None = None) -> dict[str, str]:
    """Environment of launched jobs; ``fault``: a ``FCMAE_FAULT`` injection (:mod:`trainer.resilience.faults`)."""
    out = dict(os.environ)
    out.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    out["DS_ACCELERATOR"] = "cpu"
    out.pop("MLFLOW_TRACKING_URI", None)
    out.pop("FCMAE_FAULT", None)
    if fault is not None:
        out["FCMAE_FAULT"] = fault
    return out


def run(cmd: list[str], timeout: float = 300) -> int:
    """Run to the end; returns the exit code."""
    return subprocess.run(
        cmd, env=env(), timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ).returncode


def start(cmd: list[str], log: Path, fault: str | None = None) -> subprocess.Popen:
    """Start in the background, logging to a file (with a fault injected, when given)."""
    return subprocess.Popen(cmd, env=env(fault), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def run_processes(run_dir: Path) -> dict[int, int]:
    """``pid -> process group`` of every live process whose command line names the run directory (ranks and their
    forked dataloader workers)."""
    out = subprocess.run(["ps", "-wweo", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        pid, pgid, stat, args = line.strip().split(None, 3)
        if "trainer.worker" in args and str(run_dir) in args.split() and not stat.startswith("Z"):
            found[int(pid)] = int(pgid)
    return found


def wait_for(
    predicate: Callable[[], bool], timeout: float = 240, what: str = "condition", proc: subprocess.Popen | None = None
) -> None:
    """Poll until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def logged_steps(run_dir: Path) -> list[dict]:
    """The training-interval records of ``metrics.jsonl`` written so far (rank 0, one per log interval)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "train"]


def preempt(proc: subprocess.Popen) -> int:
    """Send SLURM's warning signal to the launcher (it forwards it to every rank); returns the exit code."""
    proc.send_signal(signal.SIGUSR2)
    return proc.wait(timeout=180)
