"""Fixtures of the trainer tests (helpers live in tests/support)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv(
        "TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(repo / ".cache/torch_extensions"))
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
