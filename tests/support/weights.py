"""Comparing trained weights: what a run exported, what it started from, and how far two runs ended apart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.config import PretrainConfig, load_run_config
from trainer.resilience.checkpoint import LATEST, MARKER
from trainer.resilience.integrity import digest_share
from trainer.stages.pretrain import build_model


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported FCMAE weights (encoder + decoder) of a finished pretraining run."""
    return load_file(str(run_dir / "export" / "fcmae.safetensors"))


def initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a pretraining run started from, rebuilt from its stored config and seed as the trainer does."""
    cfg = load_run_config(run_dir / "config.yaml")
    assert isinstance(cfg, PretrainConfig)
    torch.manual_seed(cfg.seed)
    return {k: v.detach().float() for k, v in build_model(cfg).state_dict().items()}


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> float:
    """``|a - b| / |a - init|`` over all weights: how far two runs ended apart, measured against how far training
    moved the weights (0 = identical; ~0.1 for the same run with the learning rate x 1.1)."""
    assert a.keys() == b.keys() == init.keys()
    apart = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    moved = sum(float((a[k].double() - init[k].double()).pow(2).sum()) for k in a)
    assert moved > 0, "the weights never moved: nothing was trained"
    return (apart / moved) ** 0.5


def copy_with_loader_ahead(run_dir: Path, copy: Path) -> None:
    """A copy of ``run_dir`` whose latest checkpoint resumes the loader one batch too far (a wrong resume
    position): the negative control of the resume proofs."""
    shutil.copytree(run_dir, copy)
    latest = copy / "checkpoints" / (copy / "checkpoints" / LATEST).read_text().strip()
    for file in latest.glob("rank_*.pt"):
        state = torch.load(file, weights_only=True)
        state["loader"]["position"] += 1
        torch.save(state, file)
    # Re-record the changed files' sizes and hashes: the resume must take this checkpoint, not refuse it as damaged.
    marker = json.loads((latest / MARKER).read_text())
    marker["files"].update(digest_share(latest, sorted(p.name for p in latest.glob("rank_*.pt")), 0, 1))
    (latest / MARKER).write_text(json.dumps(marker))
