"""Exact resume after preemption, SIGKILL during saves, resume on another world size, retention."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.faults.conftest import launch_cmd, logged_steps, preempt, run, start, wait_for, weights
from trainer.checkpoint import LATEST, MARKER
from trainer.preemption import REQUEUE_EXIT_CODE

STEPS = 12
COMMON = ("data.batch_size=4", f"schedule.max_steps={STEPS}", "checkpoint.every_steps=4", "checkpoint.keep=2")


# Real Fashion-MNIST shards streamed by 2 dataloader workers per rank: resume must restore the loader too.
def _real(fmnist_shards: str) -> tuple[str, ...]:
    return (*COMMON, f"data.train_url={fmnist_shards}", "data.num_workers=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, fmnist_shards: str) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert run(launch_cmd(run_dir, *_real(fmnist_shards), ranks=2)) == 0
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted_synthetic")
    assert run(launch_cmd(run_dir, *COMMON, ranks=2)) == 0
    return run_dir


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_preempted_run_resumes_to_identical_weights(uninterrupted: Path, tmp_path: Path, fmnist_shards: str) -> None:
    at = random.Random().randint(2, STEPS - 3)
    cmd = launch_cmd(tmp_path, *_real(fmnist_shards), ranks=2)
    proc = start(cmd, tmp_path.parent / f"{tmp_path.name}.log")
    wait_for(lambda: len(logged_steps(tmp_path)) >= at, what=f"step {at}", proc=proc)
    assert preempt(proc) == REQUEUE_EXIT_CODE
    stopped_at = int((tmp_path / "checkpoints" / LATEST).read_text().strip().removeprefix("step_"))
    assert at <= stopped_at < STEPS
    assert run(cmd) == 0  # the same command resumes
    steps = [r["step"] for r in logged_steps(tmp_path)]
    assert steps == list(range(1, STEPS + 1))  # no step repeated or skipped across the restart
    losses = {r["step"]: r["loss"] for r in logged_steps(tmp_path)}
    reference = {r["step"]: r["loss"] for r in logged_steps(uninterrupted)}
    assert losses == reference
    _assert_same_weights(tmp_path, uninterrupted)


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one(uninterrupted_synthetic: Path, tmp_path: Path) -> None:
    half = ("data.batch_size=4", "schedule.max_steps=6", "checkpoint.every_steps=3")
    assert run(launch_cmd(tmp_path, *half, ranks=2)) == 0
    # Continue the same run to 12 steps on one rank with the same global batch (8): universal checkpoint.
    more = ("data.batch_size=8", f"schedule.max_steps={STEPS}", "checkpoint.every_steps=3")
    log = tmp_path.parent / f"{tmp_path.name}-resume.log"
    assert start(launch_cmd(tmp_path, *more, ranks=1), log).wait(timeout=300) == 0
    assert "written by 2 ranks, this job has 1: converting it to a universal checkpoint" in log.read_text()
    records = logged_steps(tmp_path)
    steps = [r["step"] for r in records]
    assert steps == list(range(1, STEPS + 1))
    reference = {r["step"]: r["loss"] for r in logged_steps(uninterrupted_synthetic)}
    # The loss continues where it was: same samples, same optimizer state, fp32 within reduction-order noise.
    for r in records[6:]:
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-4)


@pytest.mark.slow
def test_sigkill_during_save_leaves_a_resumable_run(tmp_path: Path) -> None:
    rng = random.Random()
    cmd = launch_cmd(
        tmp_path, "data.batch_size=4", "schedule.max_steps=8", "checkpoint.every_steps=1", "checkpoint.keep=2"
    )
    ckpt = tmp_path / "checkpoints"

    def partial() -> set[tuple[str, int]]:
        """Checkpoint directories without their marker (a save in flight, or leftovers of a killed one)."""
        if not ckpt.exists():
            return set()
        return {(d.name, d.stat().st_ino) for d in ckpt.iterdir() if d.is_dir() and not (d / MARKER).exists()}

    kills = 0
    for trial in range(5):
        leftovers = partial()

        def saving(leftovers: set[tuple[str, int]] = leftovers) -> bool:
            return bool(partial() - leftovers)

        proc = start(cmd, tmp_path.parent / f"{tmp_path.name}-{trial}.log")
        wait_for(saving, timeout=120, what="a save in flight", proc=proc)
        time.sleep(rng.uniform(0.0, 0.05))  # a random moment inside the save
        proc.kill()  # SIGKILL the launcher and its ranks
        subprocess.run(["pkill", "-9", "-f", f"trainer.worker {tmp_path}"], check=False)
        proc.wait(timeout=30)
        kills += 1
        if (ckpt / LATEST).exists():
            latest = (ckpt / LATEST).read_text().strip()
            assert (ckpt / latest / MARKER).exists(), "latest points at an incomplete checkpoint"
    assert kills == 5
    assert run(cmd) == 0
    assert [r["step"] for r in logged_steps(tmp_path)][-1] == 8
    assert (tmp_path / "export" / "model.safetensors").exists()


@pytest.mark.slow
def test_retention_keeps_exactly_k(tmp_path: Path) -> None:
    assert (
        run(
            launch_cmd(
                tmp_path, "data.batch_size=4", "schedule.max_steps=7", "checkpoint.every_steps=1", "checkpoint.keep=3"
            )
        )
        == 0
    )
    kept = sorted(d.name for d in (tmp_path / "checkpoints").iterdir() if d.is_dir())
    assert kept == ["step_00000005", "step_00000006", "step_00000007"]
    assert (tmp_path / "checkpoints" / LATEST).read_text() == "step_00000007"


@pytest.mark.slow
def test_checkpoint_mirrored_to_s3_resumes_after_local_loss(tmp_path: Path, s3_bucket: str) -> None:
    mirror = f"{s3_bucket}/runs/demo"
    first = launch_cmd(tmp_path, "data.batch_size=4", "schedule.max_steps=4", "checkpoint.every_steps=2",
                       f"checkpoint.mirror_url={mirror}")  # fmt: skip
    assert run(first) == 0
    shutil.rmtree(tmp_path / "checkpoints")  # the node's disk is gone; the mirror is not
    log = tmp_path.parent / f"{tmp_path.name}-mirror.log"
    second = launch_cmd(tmp_path, "data.batch_size=4", "schedule.max_steps=6", "checkpoint.every_steps=2",
                        f"checkpoint.mirror_url={mirror}")  # fmt: skip
    assert start(second, log).wait(timeout=300) == 0
    assert "resuming from the mirror: fetched step_00000004" in log.read_text()
    assert [r["step"] for r in logged_steps(tmp_path)] == [1, 2, 3, 4, 5, 6]
