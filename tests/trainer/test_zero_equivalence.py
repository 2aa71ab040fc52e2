"""2 ranks on gloo with ZeRO-1/2/3 follow the same loss curve as 1 rank with the same global batch.

Synthetic data gives both layouts the same samples at every step (rank r takes batch slot r), masks derive from
sample keys and drop path is off, so the only difference is floating-point reduction order: fp32 losses agree to
1e-5 relative over 6 steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.conftest import launch, logged

STEPS = 6


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("one_rank")
    assert launch(run_dir, "data.batch_size=8", f"schedule.max_steps={STEPS}", "deepspeed.zero_stage=0") == 0
    assert (run_dir / "mlartifacts").is_dir()  # the default sqlite store keeps artifacts in the run directory
    return [r["loss"] for r in logged(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_rank(stage: int, one_rank: list[float], tmp_path: Path) -> None:
    assert (
        launch(tmp_path, "data.batch_size=4", f"schedule.max_steps={STEPS}", f"deepspeed.zero_stage={stage}", ranks=2)
        == 0
    )
    two_ranks = [r["loss"] for r in logged(tmp_path)]
    assert len(two_ranks) == len(one_rank) == STEPS
    assert one_rank[-1] < one_rank[0]  # it trains
    assert two_ranks == pytest.approx(one_rank, rel=1e-5)
    assert (tmp_path / "export" / "model.safetensors").exists()
