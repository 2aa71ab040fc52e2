"""The evaluation loop every stage shares; the stage supplies only the work done on each batch and the reduction.

:func:`evaluate` puts the model in eval mode (ZeRO-3 parameters gathered, the run's autocast, no gradients), hands
the stage an :class:`EvalPasses` and restores the training mode. A stage runs each fixed pass over a loader with
:meth:`EvalPasses.run`, which moves every batch to the device and, after every batch, asks all ranks whether a
preemption arrived (a collective, the same number of times on every rank); when one did, the pass stops, the stage
returns at once, and the evaluation is reported as stopped so that the trainer saves and the resumed run redoes it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from data.batch import Batch, Loader
from trainer.config import EvalConfig
from trainer.distributed import DistEnv
from trainer.engine import autocast
from trainer.optim import Schedule
from trainer.zero import gathered_parameters

log = logging.getLogger(__name__)

StopCheck = Callable[[], bool]
"""Collective: true on every rank once any rank received a preemption signal."""


@dataclass
class Evaluation:
    """Metrics of an evaluation, and files to log with it (``artifact folder -> path``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[str, Path]] = field(default_factory=list)
    stopped: tuple[int, int] | None = None
    """(batches done, batches in the pass) when a preemption stopped it; its metrics are then not reported."""
    tags: dict[str, str] = field(default_factory=dict)
    """MLflow tags to set (a collapse warning)."""


class EvalPasses:
    """Runs a stage's passes over its evaluation loaders, giving way to a preemption between batches."""

    def __init__(self, device: torch.device, stop: StopCheck) -> None:
        self.device = device
        self.stop = stop
        self.stopped: tuple[int, int] | None = None

    def run(self, loader: Loader, work: Callable[[Batch], None]) -> bool:
        """``work(batch)`` for every batch of the loader's fixed pass (epoch 0, in order; images on the device).
        False when a preemption stopped the pass (or an earlier one): the stage then returns at once."""
        if self.stopped is not None:
            return False
        loader.set_epoch(0)  # the same fixed pass every time
        for done, batch in enumerate(loader, start=1):
            work(batch.to(self.device))
            if self.stop():
                self.stopped = (done, len(loader))
                return False
        return True


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, engine: Any, precision: str, device: torch.device) -> Iterator[None]:
    """Eval mode, full (ZeRO-3 gathered) parameters, the run's autocast and no gradients; training mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), gathered_parameters(model, engine), autocast(precision, device):
            yield
    finally:
        model.train(was_training)


class Evaluable(Protocol):
    """What :func:`evaluate` needs of a stage (:class:`trainer.stages.Stage` has it)."""

    @property
    def model(self) -> nn.Module: ...

    def evaluate(self, passes: EvalPasses, step: int) -> Evaluation: ...


def evaluation_due(cfg: EvalConfig, step: int, schedule: Schedule) -> bool:
    """Whether the trainer evaluates after ``step``: every ``eval.every_steps``, at the end of each epoch with
    ``eval.each_epoch``, and after the last step."""
    epoch_end = cfg.each_epoch and step % schedule.steps_per_epoch == 0
    return step % cfg.every_steps == 0 or step == schedule.total or epoch_end


def evaluate(stage: Evaluable, engine: Any, step: int, precision: str, env: DistEnv, stop: StopCheck) -> Evaluation:
    """One evaluation of a stage at ``step`` (every rank; rank 0's result is logged); one stopped by a preemption
    comes back with ``stopped`` set and no metrics."""
    if env.is_main:
        log.info("step %d: evaluating", step)
    started = time.perf_counter()
    passes = EvalPasses(env.device, stop)
    with evaluation_mode(stage.model, engine, precision, env.device):
        result = stage.evaluate(passes, step)
    if passes.stopped is None:
        return result
    if env.is_main:
        done, total = passes.stopped
        log.warning("evaluation at step %d stopped after %d of %d batches: preemption (%.1fs)",
                    step, done, total, time.perf_counter() - started)  # fmt: skip
    return Evaluation(stopped=passes.stopped)
