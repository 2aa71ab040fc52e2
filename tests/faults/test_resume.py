"""Exact resume after preemption, SIGKILL during saves, resume on another world size, retention.

Resume proofs compare final weights (exactly, or against the size of the training signal with
``|w_a - w_b| / |w_a - w_init|``), never early losses alone (FCMAE's loss moves ~1e-5 in a few steps). Each has a
negative control in the same test: the same resume with the loader one batch ahead must be rejected.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.support.launch import launch_cmd, logged_steps, preempt, run, start, wait_for
from tests.support.weights import copy_with_loader_ahead, exported_weights, initial_weights, relative_distance
from trainer.resilience.checkpoint import LATEST, MARKER
from trainer.resilience.ledger import read_ledger
from trainer.resilience.preemption import REQUEUE_EXIT_CODE

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
    wa, wb = exported_weights(a), exported_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.slow
def test_preempted_run_resumes_to_identical_weights(uninterrupted: Path, tmp_path: Path, fmnist_shards: str) -> None:
    at = random.Random().randint(2, STEPS - 3)
    run_dir = tmp_path / "run"
    cmd = launch_cmd(run_dir, *_real(fmnist_shards), ranks=2)
    proc = start(cmd, tmp_path / "first.log")
    wait_for(lambda: len(logged_steps(run_dir)) >= at, what=f"step {at}", proc=proc)
    assert preempt(proc) == REQUEUE_EXIT_CODE
    stopped_at = int((run_dir / "checkpoints" / LATEST).read_text().strip().removeprefix("step_"))
    assert at <= stopped_at < STEPS
    copy_with_loader_ahead(run_dir, tmp_path / "wrong")
    saved = torch.load(run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "rank_00000.pt", weights_only=True)
    first_segment_s = saved["loop"]["train_time_s"]
    assert run(cmd) == 0  # the same command resumes
    # metrics.json describes the whole run, not the last segment: the loop state travels in the checkpoint.
    whole, reference_run = (json.loads((d / "export" / "metrics.json").read_text()) for d in (run_dir, uninterrupted))
    assert whole["first_loss"] == reference_run["first_loss"]
    assert (whole["restarts"], reference_run["restarts"]) == (1, 0)
    assert whole["train_time_s"] > first_segment_s > 0
    steps = [r["step"] for r in logged_steps(run_dir)]
    assert steps == list(range(1, STEPS + 1))  # no step repeated or skipped across the restart
    losses = {r["step"]: r["loss"] for r in logged_steps(run_dir)}
    reference = {r["step"]: r["loss"] for r in logged_steps(uninterrupted)}
    assert losses == reference
    _assert_same_weights(run_dir, uninterrupted)
    # Negative control: the same resume with the loader one batch ahead trains other weights.
    assert run(launch_cmd(tmp_path / "wrong", *_real(fmnist_shards), ranks=2)) == 0
    with pytest.raises(AssertionError):
        _assert_same_weights(tmp_path / "wrong", uninterrupted)


@pytest.mark.slow
def test_checkpoint_from_two_ranks_resumes_on_one(uninterrupted_synthetic: Path, tmp_path: Path) -> None:
    """2 ranks x 4 for 6 steps, then 1 rank x 8 to 12 steps, ends with the weights of 2 ranks x 4 for 12 steps
    (universal checkpoint; the synthetic loader serves the same global batches on both layouts)."""
    run_dir = tmp_path / "run"
    half = ("data.batch_size=4", "schedule.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep=5")
    assert run(launch_cmd(run_dir, *half, ranks=2)) == 0
    copy_with_loader_ahead(run_dir, tmp_path / "wrong")
    # Continue the same run to 12 steps on one rank with the same global batch (8): universal checkpoint.
    more = ("data.batch_size=8", f"schedule.max_steps={STEPS}", "checkpoint.every_steps=3", "checkpoint.keep=5")
    log = tmp_path / "resume.log"
    assert start(launch_cmd(run_dir, *more, ranks=1), log).wait(timeout=300) == 0
    assert "written by 2 ranks, this job has 1: converting it to a universal checkpoint" in log.read_text()
    assert [r["step"] for r in logged_steps(run_dir)] == list(range(1, STEPS + 1))
    reference, init = exported_weights(uninterrupted_synthetic), initial_weights(uninterrupted_synthetic)
    distance = relative_distance(reference, exported_weights(run_dir), init)
    # Negative control: the same world-size change resumed one batch ahead in the data. Its checkpoint directory
    # gets the finished conversion, which a retry reuses (marked complete) instead of converting again.
    universal = "step_00000006_universal"
    shutil.copytree(run_dir / "checkpoints" / universal, tmp_path / "wrong" / "checkpoints" / universal)
    wrong_log = tmp_path / "wrong.log"
    assert start(launch_cmd(tmp_path / "wrong", *more, ranks=1), wrong_log).wait(timeout=300) == 0
    assert "converting" not in wrong_log.read_text()
    control = relative_distance(reference, exported_weights(tmp_path / "wrong"), init)
    assert distance < 1e-3 < control, f"resumed on 1 rank: {distance:.2e}, loader one batch ahead: {control:.2e}"


@pytest.mark.slow
def test_zero0_checkpoint_loads_on_another_world_size_as_it_is(uninterrupted_synthetic: Path, tmp_path: Path) -> None:
    """ZeRO-0 writes whole weights and optimizer state: 2 ranks -> 1 rank loads them directly (no universal
    conversion, which would fail for want of ZeRO's optimizer shards) and trains the same weights."""
    run_dir = tmp_path / "run"
    zero0 = ("deepspeed.zero_stage=0", "checkpoint.every_steps=3")
    assert run(launch_cmd(run_dir, *zero0, "data.batch_size=4", "schedule.max_steps=6", ranks=2)) == 0
    copy_with_loader_ahead(run_dir, tmp_path / "wrong")
    more = (*zero0, "data.batch_size=8", f"schedule.max_steps={STEPS}")
    log = tmp_path / "resume.log"
    assert start(launch_cmd(run_dir, *more, ranks=1), log).wait(timeout=300) == 0
    assert "resumed from" in log.read_text() and "converting" not in log.read_text()
    assert [r["step"] for r in logged_steps(run_dir)] == list(range(1, STEPS + 1))
    reference, init = exported_weights(uninterrupted_synthetic), initial_weights(uninterrupted_synthetic)
    distance = relative_distance(reference, exported_weights(run_dir), init)  # ZeRO-0 and ZeRO-1: the same math
    assert run(launch_cmd(tmp_path / "wrong", *more, ranks=1)) == 0
    control = relative_distance(reference, exported_weights(tmp_path / "wrong"), init)
    assert distance < 1e-3 < control, f"resumed on 1 rank: {distance:.2e}, loader one batch ahead: {control:.2e}"


@pytest.mark.slow
def test_world_size_change_on_real_shards_repeats_no_sample(fmnist_shards: str, tmp_path: Path) -> None:
    """Real shards, 2 dataloader workers per rank: 2 ranks x 8 preempted mid-epoch, resumed on 1 rank x 16.
    The sample ledger of the whole epoch holds no sample twice and skips at most one new global batch - 1
    (the loader's documented bound), and the loss goes on falling after the resume."""
    steps = 48  # one epoch of 768 samples at a global batch of 16
    common = (f"data.train_url={fmnist_shards}", "data.num_workers=2", "tracking.sample_ledger=true",
              "optim.base_lr=1e-2", f"schedule.max_steps={steps}", "checkpoint.every_steps=1000")  # fmt: skip
    run_dir = tmp_path / "run"
    at = random.Random().randint(8, 20)
    proc = start(launch_cmd(run_dir, *common, "data.batch_size=8", ranks=2), tmp_path / "first.log")
    wait_for(lambda: len(logged_steps(run_dir)) >= at, what=f"step {at}", proc=proc)
    assert preempt(proc) == REQUEUE_EXIT_CODE
    stopped_at = len(logged_steps(run_dir))
    log = tmp_path / "resume.log"
    assert start(launch_cmd(run_dir, *common, "data.batch_size=16", ranks=1), log).wait(timeout=300) == 0
    assert "converting it to a universal checkpoint" in log.read_text()

    ledger = read_ledger(run_dir / "ledger")
    assert list(ledger) == list(range(1, steps + 1))  # every step trained once, across the restart
    assert all(entry["epoch"] == 0 and len(entry["keys"]) == 16 for entry in ledger.values())
    keys = [key for entry in ledger.values() for key in entry["keys"]]
    assert len(keys) == len(set(keys)), "a sample of the epoch was trained twice"
    assert 768 - (1 * 16 - 1) <= len(set(keys)) <= 768
    losses = [r["loss"] for r in logged_steps(run_dir)]
    before, after = sum(losses[stopped_at - 5 : stopped_at]) / 5, sum(losses[-5:]) / 5
    assert after < before - 0.02, f"loss before the resume {before:.4f}, at the end {after:.4f}"


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
