"""The run directory: every path of a run, and the resolved config stored there. Re-running the same command resumes.

:class:`RunDir` is the one home of the layout; everything that reads or writes inside a run directory asks it::

    config.yaml        the resolved config              lock.json(.guard)  the live run's lock (resilience.run_lock)
    checkpoints/       step_N/, latest (checkpoint.py)   rollbacks.jsonl    rollbacks made (resilience.recovery)
    export/            model.safetensors, metrics.json,  segments.jsonl     every start of the run
                       mlflow_model_id (its MLflow model)
    ledger/            sample keys per step              metrics.jsonl      every logged number (observability)
    images/            reconstruction grids              mlflow_run_id      the MLflow run a requeued job continues
    index/             indexes of foreign shards         mlflow.db          the default MLflow store
    failures/          one file per failed rank          hangs/             watchdog stack dumps, NCCL traces
    profile/           profiler traces                   slurm/             submitit's folders, jobs.txt, restarts
    init/              model.init_from converted once (stages.continuation): weights.safetensors, source.json
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, TrainConfig, read_stored_config
from trainer.export import atomic_write_text

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
"""The file that makes a checkpoint directory complete (written last; :mod:`trainer.resilience.checkpoint`)."""
LATEST = "latest"
"""The pointer naming the newest complete checkpoint, in ``checkpoints/`` and on the mirror."""

MODEL_ID_FILE = "mlflow_model_id"
"""Beside an export's files: the id of the MLflow logged model holding them (a later stage links it as an input)."""


@dataclass(frozen=True)
class RunDir:
    """Every path of one run directory (see the module docstring)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def export_weights(self) -> Path:
        """The stage's consolidated weights, what the next stage reads."""
        return self.export / "model.safetensors"

    @property
    def export_metrics(self) -> Path:
        """The stage's final metrics, written last: its presence means the export is complete."""
        return self.export / "metrics.json"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def index(self) -> Path:
        """Indexes of shards without a manifest whose own location was not writable."""
        return self.root / "index"

    @property
    def init(self) -> Path:
        """``model.init_from`` converted to this project's FCMAE layout, once (:mod:`trainer.stages.continuation`)."""
        return self.root / "init"

    @property
    def failures(self) -> Path:
        return self.root / "failures"

    @property
    def hangs(self) -> Path:
        return self.root / "hangs"

    @property
    def profile(self) -> Path:
        return self.root / "profile"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    @property
    def export_model_id(self) -> Path:
        """The export's MLflow logged model (written when the export is logged and registered)."""
        return self.export / MODEL_ID_FILE

    @property
    def lock(self) -> Path:
        return self.root / "lock.json"

    @property
    def rollbacks(self) -> Path:
        return self.root / "rollbacks.jsonl"

    @property
    def segments(self) -> Path:
        return self.root / "segments.jsonl"

    @property
    def metrics_log(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def mlflow_run_id(self) -> Path:
        return self.root / "mlflow_run_id"

    @property
    def mlflow_store(self) -> Path:
        return self.root / "mlflow.db"

    def trained(self) -> bool:
        """Whether it holds anything trained: a checkpoint directory or an export."""
        saved = self.checkpoints.is_dir() and any(
            p.is_dir() and p.name.startswith("step_") for p in self.checkpoints.iterdir()
        )
        return saved or self.export.exists()

    def complete(self) -> bool:
        """Whether the stage finished: its export's metrics are written."""
        return self.export_metrics.exists()


# Keys that may change between restarts of one run: where and how it runs, not what it trains. Per-device batch
# and accumulation may change with the world size (the trainer warns if the global batch changes).
RESTART_MUTABLE = (
    "cluster.",
    "data.num_workers",
    "data.batch_size",  # with data.batch_size_choices
    "deepspeed.grad_accum",
    "deepspeed.global_batch",
    "tracking.",
    "eval.",
    "checkpoint.mirror_url",
    "checkpoint.mirror_queue",
    "checkpoint.keep",
    "checkpoint.every_minutes",
    "checkpoint.write_mb_per_s",
    "schedule.spike_factor",
    "schedule.spike_window",
    "schedule.max_rollbacks",
    "schedule.max_steps",
)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def prepare_run_dir(cfg: TrainConfig, run_dir: Path) -> bool:
    """Create the run directory and store the resolved config; returns True when it resumes an existing run.

    A run directory already holding a different config is refused (naming the keys that differ) unless only
    restart-safe keys changed (cluster resources, workers, tracking, the step cap), or nothing was trained there
    yet (no checkpoint, no export: a run that failed at start-up takes the corrected config).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).config
    resumed = path.exists()
    if resumed:
        old = _flat(read_stored_config(path))
        new = _flat(cfg.model_dump(mode="json"))
        changed = sorted(
            k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(RESTART_MUTABLE)
        )
        if changed and not RunDir(run_dir).trained():
            log.warning("%s: replacing the config of a run that never saved a checkpoint (%s)", run_dir,
                        ", ".join(changed))  # fmt: skip
        elif changed:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{run_dir} holds a run with a different config ({details}). Re-run with the original settings to "
                "resume it, or pass another --run-dir to start a new run."
            )
    atomic_write_text(path, cfg.to_yaml())
    return resumed
