"""The run directory lock: a live holder refuses a second run by name; a dead one (its processes gone, its host
rebooted, its heartbeat stale) is taken over with a log line; a requeued SLURM job takes over its own lock. The
launcher end to end (a second launch refused while a run trains) is in tests/faults/test_matrix.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.resilience.run_lock import STALE_S, RunDirLocked, RunLock, process_start
from trainer.run_dir import RunDir


def _holder(run_dir: Path, **fields: object) -> None:
    record = {"token": "other", "role": "launcher", "host": socket.gethostname(), "pid": 1, "pids": {},
              "slurm_job_id": None, "started": time.time(), "heartbeat": time.time(), **fields}  # fmt: skip
    RunDir(run_dir).lock.write_text(json.dumps(record))


def test_a_live_holder_refuses_by_name_and_a_dead_one_is_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _holder(tmp_path, pid=sleeper.pid, pids={str(sleeper.pid): process_start(sleeper.pid)})
        with pytest.raises(RunDirLocked, match=rf"launcher pid {sleeper.pid} on {socket.gethostname()}"):
            RunLock(tmp_path).acquire(wait_s=0)
        # A reused pid (same number, another start time) is no holder.
        _holder(tmp_path, pid=sleeper.pid, pids={str(sleeper.pid): (process_start(sleeper.pid) or 0) - 1})
        lock = RunLock(tmp_path)
        with caplog.at_level(logging.WARNING):
            lock.acquire(wait_s=0)
        assert "taking over the lock" in caplog.text and "none of its processes" in caplog.text
        assert json.loads(RunDir(tmp_path).lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirLocked):  # now this process holds it: another claim is refused
            RunLock(tmp_path).acquire(wait_s=0)
        lock.release()
        assert not RunDir(tmp_path).lock.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_other_hosts_by_heartbeat_reboots_and_slurm_requeues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _holder(tmp_path, host="node-17", heartbeat=time.time() - 5)
    with pytest.raises(RunDirLocked, match=r"launcher pid 1 on node-17 .*heartbeat 5s ago"):
        RunLock(tmp_path).acquire(wait_s=0)
    _holder(tmp_path, host="node-17", heartbeat=time.time() - STALE_S - 1)
    RunLock(tmp_path).acquire(wait_s=0)  # stale: taken over
    _holder(tmp_path, boot_id="an-earlier-boot", pids={str(os.getpid()): process_start(os.getpid())})
    RunLock(tmp_path).acquire(wait_s=0)  # this host rebooted since: its pids mean nothing
    _holder(tmp_path, host="node-17", role="SLURM job", slurm_job_id="4242")
    with pytest.raises(RunDirLocked, match=r"SLURM job 4242"):
        RunLock(tmp_path).check_free()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    RunLock(tmp_path).acquire(wait_s=0)  # the same job, requeued: its new attempt takes over


def test_ranks_of_a_dead_launcher_are_waited_for(tmp_path: Path) -> None:
    """A holder whose launcher is gone but whose rank still runs (it saves before stopping) is waited for."""
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    _holder(tmp_path, pid=999999, pids={"999999": 1, str(rank.pid): process_start(rank.pid)})
    started = time.monotonic()
    RunLock(tmp_path).acquire(wait_s=30)
    assert rank.poll() is not None and 1.0 < time.monotonic() - started < 30
    _holder(tmp_path, pid=999999, pids={str(os.getpid()): process_start(os.getpid())})
    with pytest.raises(RunDirLocked):  # still running after the wait: refused
        RunLock(tmp_path).acquire(wait_s=1)
