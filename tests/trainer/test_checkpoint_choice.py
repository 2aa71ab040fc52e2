"""Which checkpoint a resume picks, from what is on disk: markers that parse but are no record, a step damaged
twice, checkpoints a rollback abandoned. Directories are written by hand (no DeepSpeed needed to choose)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.config import CheckpointConfig
from trainer.distributed import DistEnv
from trainer.resilience.checkpoint import LATEST, MARKER, Checkpointer, step_tag
from trainer.resilience.integrity import digest_share

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _checkpoint(root: Path, step: int, timeline: int = 0, marker: str | None = None) -> Path:
    """A checkpoint directory with one state file, its marker (hashes recorded) and the pointer at it."""
    directory = root / step_tag(step)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rank_00000.pt").write_bytes(bytes(range(256)) * (step + 1))
    record = {"step": step, "world_size": 1, "timeline": timeline,
              "files": digest_share(directory, ["rank_00000.pt"], 0, 1)}  # fmt: skip
    (directory / MARKER).write_text(json.dumps(record) if marker is None else marker)
    (root / LATEST).write_text(directory.name)
    return directory


def _checkpointer(root: Path, rollback_targets: list[int] | None = None) -> Checkpointer:
    if rollback_targets is None:
        return Checkpointer(root, CheckpointConfig(), ENV)
    return Checkpointer(root, CheckpointConfig(), ENV, rollback_targets)


@pytest.mark.parametrize("marker", ["null", "{}", '{"step": "four", "world_size": 1}', "[4, 1]", '"COMPLETE"'])
def test_a_marker_that_parses_but_is_no_checkpoint_record_falls_back(tmp_path: Path, marker: str) -> None:
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4, marker=marker)
    found = _checkpointer(tmp_path).find_latest()
    assert found is not None and found.step == 2
    # Control: the same layout with a real record resumes from step 4.
    _checkpoint(tmp_path, 4)
    found = _checkpointer(tmp_path).find_latest()
    assert found is not None and found.step == 4


def test_a_step_damaged_twice_is_set_aside_twice_and_the_previous_one_used(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 2)
    for attempt in (1, 2, 3):  # the step is saved again after each resume, and damaged again
        damaged = _checkpoint(tmp_path, 8)
        (damaged / "rank_00000.pt").write_bytes(b"cut short")
        found = _checkpointer(tmp_path).find_latest()
        assert found is not None and found.step == 2, attempt
    assert sorted(d.name for d in tmp_path.glob("damaged_*")) == [
        "damaged_step_00000008", "damaged_step_00000008.2", "damaged_step_00000008.3"
    ]  # fmt: skip


def test_checkpoints_a_rollback_abandoned_are_never_resumed_and_are_removed(tmp_path: Path) -> None:
    """Rollback 0 restored step 4 (timeline 0 -> 1): steps 6 and 8 of timeline 0 are abandoned, even with the
    pointer still at step 8 (a crash before it moved); step 6 saved after the rollback (timeline 1) is not."""
    for step in (2, 4, 6, 8):
        _checkpoint(tmp_path, step)
    control = _checkpointer(tmp_path).find_latest()  # no rollback recorded: the newest
    assert control is not None and control.step == 8
    found = _checkpointer(tmp_path, [4]).find_latest()
    assert found is not None and found.step == 4
    assert sorted(d.name for d in tmp_path.glob("step_*")) == ["step_00000002", "step_00000004"]
    _checkpoint(tmp_path, 6, timeline=1)  # trained again after the rollback
    found = _checkpointer(tmp_path, [4]).find_latest()
    assert found is not None and found.step == 6
    # A second rollback (timeline 1 -> 2) to step 2 abandons steps 4 and 6 as well.
    found = _checkpointer(tmp_path, [4, 2]).find_latest()
    assert found is not None and found.step == 2
