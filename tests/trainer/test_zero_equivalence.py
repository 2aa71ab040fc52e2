"""2 ranks on gloo with ZeRO-1/2/3 train the same weights as 1 rank with the same global batch.

Synthetic data gives both layouts the same samples at every step (rank r takes batch slot r), masks derive from
sample keys and drop path is off, so the only difference is floating-point reduction order. Early FCMAE losses
barely move (~1e-5 relative over 6 steps, whatever the run does), so the proof compares the final weights:
``|w_2ranks - w_1rank| / |w_1rank - w_init|`` must stay below :data:`BOUND`, and the same measure must exceed it
for a 1-rank run with the learning rate x 1.1 (the negative control: the bound tells a real difference apart).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.launch import launch, logged_steps
from tests.support.weights import exported_weights, initial_weights, relative_distance

STEPS = 6
BASE_LR = 1.5e-3  # demo_fcmae's optim.base_lr
BOUND = 1e-3


def _one_rank(run_dir: Path, lr: float) -> Path:
    overrides = ("data.batch_size=8", f"schedule.max_steps={STEPS}", "deepspeed.zero_stage=0", f"optim.base_lr={lr}")
    assert launch(run_dir, *overrides) == 0
    return run_dir


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = _one_rank(tmp_path_factory.mktemp("one_rank"), BASE_LR)
    assert (run_dir / "mlartifacts").is_dir()  # the default sqlite store keeps artifacts in the run directory
    return run_dir


@pytest.fixture(scope="module")
def one_rank_lr_x11(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _one_rank(tmp_path_factory.mktemp("one_rank_lr_x11"), BASE_LR * 1.1)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(stage: int, one_rank: Path, one_rank_lr_x11: Path, tmp_path: Path) -> None:
    overrides = ("data.batch_size=4", f"schedule.max_steps={STEPS}", f"deepspeed.zero_stage={stage}")
    assert launch(tmp_path, *overrides, f"optim.base_lr={BASE_LR}", ranks=2) == 0
    assert [r["step"] for r in logged_steps(tmp_path)] == list(range(1, STEPS + 1))
    reference, init = exported_weights(one_rank), initial_weights(one_rank)
    assert torch.equal(init["encoder.stem.conv.weight"], initial_weights(tmp_path)["encoder.stem.conv.weight"])
    distance = relative_distance(reference, exported_weights(tmp_path), init)
    control = relative_distance(reference, exported_weights(one_rank_lr_x11), init)
    assert distance < BOUND < control, f"2 ranks: {distance:.2e}, lr x 1.1: {control:.2e} (bound {BOUND:.0e})"
