"""Helpers for trainer tests: run the real launcher on tiny synthetic or Fashion-MNIST settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cluster.launch import main as launch_main

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
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
