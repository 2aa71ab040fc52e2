"""The sample ledger: which samples every optimizer step trained on, one JSON line per step and rank.

``<run_dir>/ledger/rank_00000.jsonl`` holds ``{"step": s, "epoch": e, "keys": [...]}`` for each step rank 0
trained (all micro-batches). On resume, steps after the checkpoint are dropped from every rank's file (they are
trained again), so the ledger of a finished run names each trained step once, across restarts and world-size
changes. Off by default (``tracking.sample_ledger``): at ImageNet scale it grows by ~20 bytes per sample seen.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from trainer.distributed import DistEnv, barrier


def _records(path: Path) -> list[dict[str, Any]]:
    """Complete records of one file (a line cut short by a kill is ignored)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _trim(path: Path, step: int) -> None:
    """Keep a ledger file's records of steps up to ``step``."""
    kept = [r for r in _records(path) if int(r["step"]) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


class SampleLedger:
    """This rank's ledger file; every rank constructs it after resuming (a collective: rank 0 trims, all wait)."""

    def __init__(self, directory: Path, env: DistEnv, resumed_step: int) -> None:
        self.path = directory / f"rank_{env.rank:05d}.jsonl"
        if env.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            for file in directory.glob("rank_*.jsonl"):
                _trim(file, resumed_step)
        barrier()
        self._file = open(self.path, "a")  # noqa: SIM115 - open for the whole run, closed by close()

    def record(self, step: int, epoch: int, keys: list[str]) -> None:
        """Append the keys of optimizer step ``step`` (flushed, so a killed run keeps what it trained)."""
        self._file.write(json.dumps({"step": step, "epoch": epoch, "keys": keys}) + "\n")
        self._file.flush()

    def rewind(self, step: int) -> None:
        """Drop this rank's records after ``step`` (a rollback discarded those steps; they train again)."""
        self._file.close()
        _trim(self.path, step)
        self._file = open(self.path, "a")  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_ledger(directory: Path) -> dict[int, dict[str, Any]]:
    """``step -> {"epoch": e, "keys": [...]}`` over all ranks' files of a run's ledger."""
    steps: dict[int, dict[str, Any]] = defaultdict(lambda: {"epoch": None, "keys": []})
    for file in sorted(directory.glob("rank_*.jsonl")):
        for r in _records(file):
            entry = steps[int(r["step"])]
            entry["epoch"] = int(r["epoch"])
            entry["keys"].extend(r["keys"])
    return dict(sorted(steps.items()))
