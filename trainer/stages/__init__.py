"""The stage contract: what pretraining, fine-tuning and detection each provide to :class:`trainer.trainer.Trainer`.

A stage lives in one module of this package (``pretrain.py``, ``finetune.py``, ``detection.py``) that exposes two
things:

- ``build_model(cfg) -> nn.Module``: the stage's network, built on the current device (the caller may enter
  ``torch.device("meta")``) from the current torch RNG state, with no file or loader touched. The trainer seeds
  the RNG with ``cfg.seed`` first; the dry-run planner (:mod:`cluster.plan`) counts parameters and activations of
  the very same model on the meta device.
- A class satisfying :class:`Stage` (constructed as ``Stage(cfg, env, run_dir, fresh=...)``): the task around the
  model, with its loaders (from :mod:`trainer.loaders`, the one place that builds loaders), loss, the per-batch work
  of its evaluation (the trainer runs the loop, :mod:`trainer.evaluation`), the files of its export and its state.
  ``fresh`` is False when the trainer resumes from a checkpoint (it decides that before building the stage): the
  checkpoint then replaces every weight, so the stage does not read the weights it starts from
  (``model.init_from``, ``model.pretrained``), and a resume does not depend on their source being reachable.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from data.batch import Batch, Loader
from trainer.config import TrainConfig
from trainer.evaluation import EvalPasses, Evaluation
from trainer.observability.metrics import FlopCount

# Stage name -> its module, imported on demand (detection pulls in torchvision's detection models).
STAGE_MODULES = {
    "pretrain": "trainer.stages.pretrain",
    "finetune": "trainer.stages.finetune",
    "detection": "trainer.stages.detection",
}
STAGE_CLASSES = {"pretrain": "PretrainStage", "finetune": "FinetuneStage", "detection": "DetectionStage"}


class Stage(Protocol):
    """What a training stage provides to the trainer."""

    @property
    def model(self) -> nn.Module:
        """The module the engine trains (built by the stage module's ``build_model``)."""

    @property
    def loader(self) -> Loader:
        """The training loader."""

    @property
    def flops(self) -> FlopCount | None:
        """Training FLOPs per sample (for MFU), when the stage can count them."""

    def optimizer(self) -> torch.optim.Optimizer:
        """The client optimizer (AdamW with the stage's parameter groups)."""

    def loss(self, engine: Any, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """Forward one micro-batch through ``engine`` and return the scalar loss, left on the device (the
        trainer reads losses only at log intervals)."""

    def before_step(self, engine: Any, step: int) -> None:
        """Called before optimizer step ``step + 1``'s micro-batches, before its lr is set (a phase of the stage
        that begins at a step: the decoder warm-up's switch)."""

    def after_step(self, engine: Any, step: int, skipped: bool) -> None:
        """Called after every optimizer step (EMA updates; ``skipped``: the update was not applied)."""

    def evaluate(self, passes: EvalPasses, step: int) -> Evaluation:
        """Every rank, in eval mode with full parameters (:func:`trainer.evaluation.evaluate`): each pass over a loader
        through ``passes.run``, returning at once when one is stopped; rank 0's result is logged."""

    def export(self, out_dir: Path, summary: dict[str, Any]) -> None:
        """Rank 0, with full parameters: write the stage's weights and, last, ``metrics.json`` to ``out_dir``."""

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


STAGE_WEIGHTS = {"pretrain": "fcmae.safetensors"}
"""The export file holding a stage's whole trained model (others: ``model.safetensors``; pretraining's is the
encoder alone, what the next stage reads)."""


def load_export(directory: Path) -> tuple[nn.Module, TrainConfig]:
    """The model a stage exported, built from its config and loaded exactly (strict): ``directory`` holds the
    weights and ``config.yaml`` (an MLflow logged model's files) or is a run's ``export/`` (the config beside it)."""
    from safetensors.torch import load_file

    from trainer.config import load_run_config

    config = directory / "config.yaml"
    cfg = load_run_config(config if config.exists() else directory.parent / "config.yaml")
    model = build_model(cfg)
    model.load_state_dict(load_file(str(directory / STAGE_WEIGHTS.get(cfg.stage, "model.safetensors"))))
    return model, cfg
