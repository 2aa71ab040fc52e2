"""The stage contract: what pretraining, fine-tuning and detection each provide to :class:`trainer.trainer.Trainer`.

A stage lives in one module of this package (``pretrain.py``, ``finetune.py``, ``detection.py``) that exposes two
things:

- ``build_model(cfg) -> nn.Module``: the stage's network, built on the current device (the caller may enter
  ``torch.device("meta")``) from the current torch RNG state, with no file or loader touched. The trainer seeds
  the RNG with ``cfg.seed`` first; the dry-run planner (:mod:`cluster.plan`) counts parameters and activations of
  the very same model on the meta device.
- A class satisfying :class:`Stage` (constructed as ``Stage(cfg, env, run_dir)``): the task around the model,
  with its loaders (from :mod:`trainer.loaders`, the one place that builds loaders), loss, evaluation, export and
  state.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.observability.metrics import FlopCount

Batch = tuple[torch.Tensor, Any, list[str]]
"""One loader batch: images, labels (a tensor, or per-image targets for detection), sample keys."""

# Stage name -> its module, imported on demand (detection pulls in torchvision's detection models).
STAGE_MODULES = {
    "pretrain": "trainer.stages.pretrain",
    "finetune": "trainer.stages.finetune",
    "detection": "trainer.stages.detection",
}
STAGE_CLASSES = {"pretrain": "PretrainStage", "finetune": "FinetuneStage", "detection": "DetectionStage"}


@dataclass
class Evaluation:
    """Metrics of an evaluation, and files to log with it (``artifact folder -> path``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[str, Path]] = field(default_factory=list)
    stopped: tuple[int, int] | None = None
    """(batches done, batches in all) when a preemption stopped it; its metrics are then not reported."""
    tags: dict[str, str] = field(default_factory=dict)
    """MLflow tags to set (a collapse warning)."""


StopCheck = Callable[[], bool]
"""Collective: true on every rank once any rank received a preemption signal. An evaluation calls it after each
batch (every rank the same number of times) and gives way when it turns true."""


class Stage(Protocol):
    """What a training stage provides to the trainer."""

    @property
    def model(self) -> nn.Module:
        """The module the engine trains (built by the stage module's ``build_model``)."""

    @property
    def loader(self) -> Any:
        """Iterable of ``(images, labels)`` with ``len``, ``epoch``, ``last_keys``, ``state_dict``,
        ``load_state_dict``."""

    @property
    def flops(self) -> FlopCount | None:
        """Training FLOPs per sample (for MFU), when the stage can count them."""

    def optimizer(self) -> torch.optim.Optimizer:
        """The client optimizer (AdamW with the stage's parameter groups)."""

    def loss(self, engine: Any, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """Forward one micro-batch through ``engine`` and return the scalar loss, left on the device (the
        trainer reads losses only at log intervals)."""

    def after_step(self, engine: Any, step: int, skipped: bool) -> None:
        """Called after every optimizer step (EMA updates; ``skipped``: the update was not applied)."""

    def evaluate(self, engine: Any, step: int, stop: StopCheck) -> Evaluation:
        """Run on every rank (ZeRO-3 gathers parameters); rank 0's result is logged. ``stop()`` after each batch:
        when true, return at once with ``stopped`` set."""

    def export(self, engine: Any, out_dir: Path, summary: dict[str, Any]) -> None:
        """Write the stage's consolidated weights and ``metrics.json`` to ``out_dir`` (every rank calls it)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state of this rank saved with each checkpoint (beyond the engine and loader)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def describe(self) -> str:
        """One line about the model for the start-up log."""


def _module(stage: str) -> Any:
    if stage not in STAGE_MODULES:
        raise ValueError(f"stage {stage!r} has no implementation; available: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[stage])


def stage_class(stage: str) -> type[Stage]:
    """The class implementing a stage (``cfg.stage``)."""
    return getattr(_module(stage), STAGE_CLASSES[stage])


def build_model(cfg: TrainConfig) -> nn.Module:
    """The network of ``cfg``'s stage, exactly as a run builds it before loading weights (see the module doc)."""
    return _module(cfg.stage).build_model(cfg)


def autocast(precision: str, device: torch.device) -> Any:
    """bf16 autocast when the run is bf16 (CUDA or CPU: DeepSpeed holds the weights in bf16, the loader gives fp32
    images); a disabled context otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
