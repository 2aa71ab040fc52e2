"""The run directory: resolved config, checkpoints, exports, MLflow store. Re-running the same command resumes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from trainer.config import ConfigError, TrainConfig, read_stored_config
from trainer.export import atomic_write_text

log = logging.getLogger(__name__)

# Keys that may change between restarts of one run: where and how it runs, not what it trains. Per-device batch
# and accumulation may change with the world size (the trainer warns if the global batch changes).
RESTART_MUTABLE = (
    "cluster.",
    "data.num_workers",
    "data.batch_size",
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


def _trained(run_dir: Path) -> bool:
    """Whether the run directory holds anything trained: a checkpoint directory or an export."""
    checkpoints = run_dir / "checkpoints"
    saved = checkpoints.is_dir() and any(p.is_dir() and p.name.startswith("step_") for p in checkpoints.iterdir())
    return saved or (run_dir / "export").exists()


def prepare_run_dir(cfg: TrainConfig, run_dir: Path) -> bool:
    """Create the run directory and store the resolved config; returns True when it resumes an existing run.

    A run directory already holding a different config is refused (naming the keys that differ) unless only
    restart-safe keys changed (cluster resources, workers, tracking, the step cap), or nothing was trained there
    yet (no checkpoint, no export: a run that failed at start-up takes the corrected config).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    resumed = path.exists()
    if resumed:
        old = _flat(read_stored_config(path))
        new = _flat(cfg.model_dump(mode="json"))
        changed = sorted(
            k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(RESTART_MUTABLE)
        )
        if changed and not _trained(run_dir):
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
