"""A non-finite loss on one rank makes every rank skip the step; too many in a row stop the run."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainer.config import load_config
from trainer.distributed import DistEnv
from trainer.resilience.failure import TrainingError
from trainer.resilience.recovery import Recovery, SkipGuard


def _rank_main(rank: int, port: int, stage: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    from data.batch import Batch
    from models.fcmae import FCMAE
    from tests.support.launch import TINY
    from trainer.config import load_config
    from trainer.distributed import init_distributed, teardown
    from trainer.engine import deepspeed_config, initialize
    from trainer.optim import build_optimizer
    from trainer.stages.pretrain import PretrainStage
    from trainer.step import OptimizerStep

    env = init_distributed()
    cfg = load_config("demo_fcmae", [*TINY, f"deepspeed.zero_stage={stage}", "data.batch_size=2"])
    stage_ = PretrainStage.__new__(PretrainStage)  # only its loss(): no loader needed
    stage_.cfg, stage_.env, stage_.num_patches, stage_.visible, stage_._eval_batch = cfg, env, 4, 1, None
    stage_.warmup = 0  # no decoder warm-up
    gen = torch.Generator().manual_seed(rank)
    good = [
        (torch.randn(2, 3, 64, 64, generator=gen), torch.zeros(2), [f"k{rank}{i}", f"k{rank}{i}b"]) for i in range(2)
    ]
    poisoned = good[0][0].clone() + 1
    if rank == 1:
        poisoned[0, 0, 0, 0] = float("nan")  # only rank 1 sees it
    cleaned = torch.nan_to_num(poisoned)

    def train(batches: list[torch.Tensor | None]) -> tuple[list[bool], torch.Tensor]:
        """A fresh engine from the same initial weights, one step per entry (None: the poisoned batch)."""
        torch.manual_seed(0)
        model = FCMAE("atto", decoder_dim=64)
        optimizer = build_optimizer(model, cfg.optim)
        engine = initialize(model, optimizer, deepspeed_config(cfg.deepspeed, cfg.optim, 2, 2))
        optimizer_step = OptimizerStep(cfg, env, stage_, engine)
        skipped = []
        for step, images in enumerate(batches):
            if images is None:
                continue
            batch = Batch(images, torch.zeros(2), [f"k{rank}{step}", f"k{rank}{step}b"], 0, [0, 0])
            skipped.append(optimizer_step([batch], step, 1e-3).skipped)
        weights = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        engine.destroy()
        return skipped, weights

    a, b = good[0][0], good[1][0]
    with_skip, w_skip = train([a, poisoned, b])  # the poisoned step is skipped on both ranks ...
    _, w_ref = train([a, None, b])  # ... so this run, which never saw it, ends identical
    control, w_control = train([a, cleaned, b])  # negative control: a step that was really taken
    result = {
        "skipped": with_skip,
        "identical_to_never_seen": bool(torch.equal(w_skip, w_ref)),
        "control_differs": not bool(torch.equal(w_control, w_ref)),
        "control_skipped": control,
        "finite": bool(torch.isfinite(w_skip).all()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    teardown(None)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_nan_on_one_rank_skips_the_step_on_all(stage: int, tmp_path: Path) -> None:
    from trainer.rendezvous import free_port

    mp.spawn(_rank_main, args=(free_port(), stage, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {
            "skipped": [False, True, False],
            "identical_to_never_seen": True,  # no update, no optimizer step count, no moment changed
            "control_differs": True,
            "control_skipped": [False, False, False],
            "finite": True,
        }, f"rank {rank}"


def test_too_many_skips_in_a_row_stop_with_advice(tmp_path: Path) -> None:
    guard = SkipGuard(max_in_row=3)
    assert not any(guard.update(skipped, step) for step, skipped in enumerate([True, True, False, True, True]))
    assert guard.total == 4
    assert guard.update(True, 5)  # the third in a row: the budget is spent (the trainer rolls back or stops)
    error = guard.error(5, tmp_path, rollbacks=3)
    assert isinstance(error, TrainingError)
    assert re.search(r"3 steps in a row .* 3 rollbacks made.* optim\.grad_clip", str(error))


def test_a_run_of_skipped_steps_that_a_checkpoint_splits_spends_the_budget_at_the_same_step(tmp_path: Path) -> None:
    """Steps 4 and 5 skipped, a checkpoint at step 5, a resume, step 6 skipped: the resumed run's budget is spent at
    step 6 with the stretch starting at step 4, as in the uninterrupted run (a rollback then restores the same
    checkpoint). Control: a resume that starts counting again finds nothing."""
    schedule = load_config("demo_fcmae").schedule.model_copy(update={"max_skipped_steps": 3})
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def recovery(run: str) -> Recovery:
        (tmp_path / run).mkdir(exist_ok=True)
        return Recovery(schedule, 10, env, tmp_path / run)

    def steps(rec: Recovery, skipped: dict[int, bool]) -> None:
        for step, skip in skipped.items():
            rec.after_step(step, [f"key{step}"], skip, tmp_path / "checkpoints")

    whole, first = recovery("whole"), recovery("segmented")
    steps(whole, {3: False, 4: True, 5: True, 6: True})
    steps(first, {3: False, 4: True, 5: True})
    saved = first.state_dict()
    resumed = recovery("segmented")
    resumed.load_state_dict(saved)
    steps(resumed, {6: True})

    def spent(rec: Recovery) -> tuple[int, int, str] | None:
        return None if rec.pending is None else (rec.pending.step, rec.pending.first_step, rec.pending.cause)

    assert spent(whole) == (6, 4, "non-finite steps") == spent(resumed)
    control = recovery("control")
    control.load_state_dict({k: v for k, v in saved.items() if k != "skipped_in_row"})
    steps(control, {6: True})
    assert spent(control) != spent(whole)
