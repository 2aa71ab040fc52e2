"""A run that changes its world size keeps its global batch and its sample sequence (``data.canonical_ranks``).

Real Fashion-MNIST shards streamed by 2 dataloader workers per rank, FCMAE with masks drawn from the sample keys:
2 ranks x 1 micro-batch and 1 rank x 2 micro-batches of the same canonical layout must train every step on the
same samples and end at the same weights up to float reduction order; a run that shrinks to 1 rank at a mid-epoch
checkpoint and grows back must train the uninterrupted run's steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.launch import launch_cmd, logged_steps, run, start
from tests.support.weights import exported_weights, initial_weights, relative_distance
from trainer.resilience.ledger import read_ledger
from trainer.resilience.preemption import REQUEUE_EXIT_CODE

STEPS = 16  # of the 48 steps of an epoch (768 samples, global batch 16)
ONE_RANK = ("deepspeed.grad_accum=2",)  # 1 rank x 2 micro-batches of 8 = the global batch of 2 ranks x 8


def _common(fmnist_shards: str) -> tuple[str, ...]:
    return (f"data.train_url={fmnist_shards}", "data.num_workers=2", "data.batch_size=8", "data.canonical_ranks=2",
            "tracking.sample_ledger=true", "optim.base_lr=1e-2", f"schedule.max_steps={STEPS}",
            "checkpoint.every_steps=1000")  # fmt: skip


def _steps(run_dir: Path) -> list[list[str]]:
    ledger = read_ledger(run_dir / "ledger")
    assert list(ledger) == list(range(1, STEPS + 1)), "every step trained once"
    return [sorted(entry["keys"]) for entry in ledger.values()]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, fmnist_shards: str) -> Path:
    run_dir = tmp_path_factory.mktemp("two_ranks")
    assert run(launch_cmd(run_dir, *_common(fmnist_shards), ranks=2)) == 0
    return run_dir


@pytest.mark.slow
def test_one_rank_accumulating_trains_the_steps_and_weights_of_two(
    two_ranks: Path, tmp_path: Path, fmnist_shards: str
) -> None:
    one = tmp_path / "one"
    assert run(launch_cmd(one, *_common(fmnist_shards), *ONE_RANK, ranks=1)) == 0
    reference = _steps(two_ranks)
    assert all(len(step) == 16 for step in reference)
    assert _steps(one) == reference
    # Negative control of the ledger: the same one-rank run planned for its own single rank composes other steps.
    own = tmp_path / "own"
    assert run(launch_cmd(own, *_common(fmnist_shards), *ONE_RANK, "data.canonical_ranks=1", ranks=1)) == 0
    assert _steps(own) != reference

    weights, init = exported_weights(two_ranks), initial_weights(two_ranks)
    distance = relative_distance(weights, exported_weights(one), init)
    # Negative control of the weights: the one-rank run with the learning rate x 1.1.
    lr = tmp_path / "lr"
    assert run(launch_cmd(lr, *_common(fmnist_shards), *ONE_RANK, "optim.base_lr=1.1e-2", ranks=1)) == 0
    assert _steps(lr) == reference
    control = relative_distance(weights, exported_weights(lr), init)
    assert distance < 1e-3 < control, f"1 rank x 2: {distance:.2e} from 2 ranks x 1; lr x 1.1: {control:.2e}"


@pytest.mark.slow
def test_shrinking_and_growing_mid_epoch_trains_the_uninterrupted_steps(
    two_ranks: Path, tmp_path: Path, fmnist_shards: str
) -> None:
    run_dir, common = tmp_path / "run", _common(fmnist_shards)
    first = start(launch_cmd(run_dir, *common, ranks=2), tmp_path / "first.log", fault="step@5=preempt")
    assert first.wait(timeout=300) == REQUEUE_EXIT_CODE
    second = start(launch_cmd(run_dir, *common, *ONE_RANK, ranks=1), tmp_path / "second.log", fault="step@11=preempt")
    assert second.wait(timeout=300) == REQUEUE_EXIT_CODE
    log = (tmp_path / "second.log").read_text()
    assert "continues at step 5 of the same sample order on 1 ranks x 2 micro-batches of 8" in log, log[-3000:]
    assert run(launch_cmd(run_dir, *common, ranks=2)) == 0
    assert [r["step"] for r in logged_steps(run_dir)] == list(range(1, STEPS + 1))
    assert _steps(run_dir) == _steps(two_ranks)
    # The world size of every segment: in metrics.json, and as a metric on the run's MLflow page.
    assert json.loads((run_dir / "export" / "metrics.json").read_text())["world_sizes"] == [2, 1, 2]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/world_size")] == [
        (0, 2.0), (5, 1.0), (11, 2.0)
    ]  # fmt: skip
    # The same schedule throughout: the weights too are the uninterrupted run's, up to float reduction order.
    weights, init = exported_weights(two_ranks), initial_weights(two_ranks)
    assert relative_distance(weights, exported_weights(run_dir), init) < 1e-3
