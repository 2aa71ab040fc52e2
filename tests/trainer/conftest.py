"""Helpers for trainer tests: run the real launcher on tiny synthetic or Fashion-MNIST settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster.launch import main as launch_main
from trainer.config import load_run_config
from trainer.pretrain import build_model

# A tiny FCMAE run: 64-px synthetic images, a narrow decoder, fp32, a step cap.
TINY = [
    "data.train_url=synthetic://512",
    "data.image_size=64",
    "data.num_workers=0",
    "model.decoder_dim=64",
    "deepspeed.precision=fp32",
    "tracking.log_every=1",
    "tracking.eval_every=1000",
    "checkpoint.every_steps=1000",
]


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv(
        "TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(repo / ".cache/torch_extensions"))
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def launch(run_dir: Path, *overrides: str, ranks: int = 1, config: str = "demo_fcmae") -> int:
    """Run ``cluster/launch.py --local`` with the tiny settings; returns its exit code."""
    return launch_main(
        [
            "--config",
            config,
            "--local",
            "--run-dir",
            str(run_dir),
            *TINY,
            f"cluster.cpu_ranks_per_node={ranks}",
            *overrides,
        ]
    )


def logged(run_dir: Path) -> list[dict]:
    """The rank-0 metric records of a run (one per log interval)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported FCMAE weights (encoder + decoder) of a finished pretraining run."""
    return load_file(str(run_dir / "export" / "fcmae.safetensors"))


def initial_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights a pretraining run started from, rebuilt from its stored config and seed as the trainer does."""
    cfg = load_run_config(run_dir / "config.yaml")
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
