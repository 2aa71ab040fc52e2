"""The decoder warm-up of a continuation (``schedule.decoder_warmup_steps``), 2 ranks through the launcher.

Under every ZeRO stage the checkpoints of the run (read as ``model.init_from`` sources, which they are) show the
encoder exactly as loaded through the warm-up and moved after it, the decoder trained from the first step, and the
encoder's AdamW state counting from the switch; the last checkpoint and the run directory give the exported weights
exactly. A run preempted inside the warm-up and resumed ends at the uninterrupted run's weights, bit for bit; a run
whose warm-up is one step longer (what a resume that restarted the warm-up would train) is the control the same
comparison must reject.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.fcmae import FCMAE
from tests.support.launch import launch_cmd, run, start
from tests.support.tensors import randomize_
from tests.support.weights import exported_weights
from trainer.export import write_weights
from trainer.resilience.preemption import REQUEUE_EXIT_CODE
from trainer.stages.continuation import read_init

WARMUP, STEPS = 2, 4


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pretrained weights without a decoder (as the official release): an encoder export of another seed."""
    path = tmp_path_factory.mktemp("pretrained") / "model.safetensors"
    write_weights(path, randomize_(FCMAE("atto", decoder_dim=64), seed=7).encoder_state_dict(), {"size": "atto"})
    return path


def _cmd(run_dir: Path, source: Path, stage: int, warmup: int = WARMUP) -> list[str]:
    return launch_cmd(
        run_dir, "data.batch_size=4", f"schedule.max_steps={STEPS}", "checkpoint.every_steps=1", "checkpoint.keep=10",
        f"deepspeed.zero_stage={stage}", f"model.init_from={source}", f"schedule.decoder_warmup_steps={warmup}",
        ranks=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """The finished run of a ZeRO stage (run once per stage, shared by the tests)."""
    done: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in done:
            run_dir = tmp_path_factory.mktemp(f"zero{stage}")
            assert run(_cmd(run_dir, source, stage)) == 0
            done[stage] = run_dir
        return done[stage]

    return get


def _checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def adam_steps(checkpoint: Path) -> dict[str, set[int]]:
    """The AdamW step counts of each part's state (``encoder``, ``decoder``) in a checkpoint of any ZeRO stage."""
    states = []
    model_states = checkpoint / "mp_rank_00_model_states.pt"
    if model_states.exists() and torch.load(model_states, weights_only=False).get("optimizer") is not None:
        states.append(torch.load(model_states, weights_only=False)["optimizer"])  # ZeRO-0: the client's own
    for file in sorted(checkpoint.glob("*optim_states.pt")):  # ZeRO-1/2: base_optimizer_state; ZeRO-3: nested
        saved = torch.load(file, weights_only=False)["optimizer_state_dict"]
        states.append(saved.get("base_optimizer_state") or saved["optimizer_state_dict"])
    assert states, f"no optimizer state in {checkpoint}"
    steps: dict[str, set[int]] = {}
    for state in states:
        groups = state["param_groups"]
        part_of = {index: group["part"] for group in groups for index in group["params"]}
        for key, value in state["state"].items():
            part = part_of.get(key, groups[key]["part"] if isinstance(key, int) and key < len(groups) else "?")
            steps.setdefault(part, set()).add(int(value["step"]))
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_encoder_stays_as_loaded_through_the_warm_up_then_trains_from_a_fresh_adamw_state(
    stage: int, source: Path, uninterrupted: Callable[[int], Path]
) -> None:
    run_dir = uninterrupted(stage)
    loaded = read_init(str(source)).encoder
    decoders = []
    for step in range(1, STEPS + 1):
        weights = read_init(str(_checkpoint(run_dir, step)))
        unchanged = [torch.equal(weights.encoder[k], loaded[k]) for k in loaded]
        assert all(unchanged) if step <= WARMUP else not all(unchanged), f"step {step}"
        decoders.append(weights.decoder)
    assert not torch.equal(decoders[0]["pred.weight"], decoders[1]["pred.weight"])  # the decoder trains meanwhile
    # Through the warm-up the encoder has no state (ZeRO-0: no gradients) or one of zero gradients (ZeRO-1-3).
    assert adam_steps(_checkpoint(run_dir, WARMUP))["decoder"] == {WARMUP}
    assert adam_steps(_checkpoint(run_dir, WARMUP + 1)) == {"encoder": {1}, "decoder": {WARMUP + 1}}
    assert adam_steps(_checkpoint(run_dir, STEPS)) == {"encoder": {STEPS - WARMUP}, "decoder": {STEPS}}
    # A run's last checkpoint and the run directory itself (its export) are sources too: the same weights, exactly.
    exported = exported_weights(run_dir)
    for source_dir in (_checkpoint(run_dir, STEPS), run_dir):
        weights = read_init(str(source_dir))
        loaded_all = {f"encoder.{k}": v for k, v in weights.encoder.items()} | weights.decoder
        assert loaded_all.keys() == exported.keys()
        assert all(torch.equal(loaded_all[k], exported[k]) for k in exported), source_dir


@pytest.mark.slow
def test_a_preemption_inside_the_warm_up_resumes_the_warm_up_where_it_stopped(
    source: Path, uninterrupted: Callable[[int], Path], tmp_path: Path
) -> None:
    stage = 3
    resumed = tmp_path / "resumed"
    first = start(_cmd(resumed, source, stage), tmp_path / "segment-1.log", fault="step@1=preempt")
    assert first.wait(timeout=300) == REQUEUE_EXIT_CODE, (tmp_path / "segment-1.log").read_text()[-3000:]
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000001"  # inside the warm-up
    assert run(_cmd(resumed, source, stage)) == 0
    control = tmp_path / "warmup_plus_one"
    assert run(_cmd(control, source, stage, warmup=WARMUP + 1)) == 0

    reference = exported_weights(uninterrupted(stage))

    def same(run_dir: Path) -> bool:
        weights = exported_weights(run_dir)
        return all(torch.equal(weights[k], reference[k]) for k in reference)

    assert same(resumed)
    assert not same(control)
