"""A non-finite loss on one rank makes every rank skip the step; too many in a row stop the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trainer.loop import SkipGuard, TrainingError


def _rank_main(rank: int, port: int, stage: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["DS_ACCELERATOR"] = "cpu"
    from models.fcmae import FCMAE
    from tests.trainer.conftest import TINY
    from trainer.config import load_config
    from trainer.distributed import init_distributed, teardown
    from trainer.engine import deepspeed_config, initialize
    from trainer.loop import train_step
    from trainer.optim import build_optimizer
    from trainer.pretrain import PretrainStage

    env = init_distributed()
    cfg = load_config("demo_fcmae", [*TINY, f"deepspeed.zero_stage={stage}", "data.batch_size=2"])
    torch.manual_seed(0)
    model = FCMAE("atto", decoder_dim=64)
    engine = initialize(model, build_optimizer(model, cfg.optim), deepspeed_config(cfg.deepspeed, cfg.optim, 2, 2))
    stage = PretrainStage.__new__(PretrainStage)  # only its loss(): no loader needed
    stage.cfg, stage.env, stage.num_patches, stage._eval_batch = cfg, env, 4, None
    stage.loader = type("Epoch0", (), {"epoch": 0})()
    imgs = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(rank))
    keys = [f"k{rank}a", f"k{rank}b"]
    poisoned = imgs.clone()
    if rank == 1:
        poisoned[0, 0, 0, 0] = float("nan")  # only rank 1 sees it

    def snapshot() -> torch.Tensor:
        return torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    before = snapshot()
    first = train_step(engine, stage, [(poisoned, torch.zeros(2), keys)], 1e-3, 0, cfg, env)
    after_skip = snapshot()
    second = train_step(engine, stage, [(imgs, torch.zeros(2), keys)], 1e-3, 1, cfg, env)
    after_step = snapshot()
    result = {
        "first_skipped": first.skipped,
        "second_skipped": second.skipped,
        "unchanged_after_skip": bool(torch.equal(before, after_skip)),
        "changed_after_good_step": not bool(torch.equal(after_skip, after_step)),
        "finite": bool(torch.isfinite(after_step).all()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    teardown(engine)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_nan_on_one_rank_skips_the_step_on_all(stage: int, tmp_path: Path) -> None:
    from trainer.distributed import free_port

    mp.spawn(_rank_main, args=(free_port(), stage, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {
            "first_skipped": True,
            "second_skipped": False,
            "unchanged_after_skip": True,
            "changed_after_good_step": True,
            "finite": True,
        }, f"rank {rank}"


def test_too_many_skips_in_a_row_stop_with_advice(tmp_path: Path) -> None:
    guard = SkipGuard(max_in_row=3)
    for step, skipped in enumerate([True, True, False, True, True]):
        guard.update(skipped, step, tmp_path)
    assert guard.total == 4
    with pytest.raises(TrainingError, match=r"3 steps in a row .* optim\.grad_clip"):
        guard.update(True, 5, tmp_path)
