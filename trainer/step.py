"""One optimizer step over ``grad_accum`` micro-batches, without waiting for the device.

A non-finite loss multiplies this rank's loss by NaN, so its gradients are NaN; DeepSpeed's gradient all-reduce
carries the NaN to every rank, and every rank skips the update (DeepSpeed's overflow check) without a collective of
ours. Drop path draws come from (seed, step, rank, micro-batch), so a resumed run draws what the uninterrupted one
drew. Host reads that remain, once per optimizer step: DeepSpeed's own overflow check and gradient norm inside
``engine.step()``, and under ZeRO-0 our finiteness check of the gradients (ZeRO-0 runs the client optimizer, which
would apply NaN gradients). Losses and the finiteness of each micro-batch stay on the device (:class:`StepResult`).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch

from data.batch import Batch, Loader
from data.sampling import derive_seed
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.engine import autocast, zero0_grad_norm
from trainer.optim import set_lr
from trainer.stages import Stage

TAG_DROP_PATH = 22


@dataclass
class StepResult:
    """What one optimizer step produced. ``loss_sum``/``loss_count`` (finite micro-batch losses of this rank)
    stay on the device; ``grad_norm`` is whatever DeepSpeed holds (read at log time)."""

    loss_sum: torch.Tensor
    loss_count: torch.Tensor
    grad_norm: Any
    skipped: bool


def micro_batch_groups(loader: Loader, accum: int, device: torch.device) -> Generator[list[Batch], None, None]:
    """Endless micro-batches of one step each; epochs advance as the loader finishes them. A partial group at the
    end of an epoch is dropped (every rank has the same batch count, so all drop it)."""
    while True:
        group: list[Batch] = []
        for batch in loader:
            group.append(batch.to(device))
            if len(group) == accum:
                yield group
                group = []


class OptimizerStep:
    """The optimizer step of one stage's engine, called with the micro-batches of a step."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, stage: Stage, engine: Any) -> None:
        self.cfg, self.env, self.stage, self.engine = cfg, env, stage, engine

    def __call__(self, group: list[Batch], step: int, lr: float) -> StepResult:
        """Optimizer step ``step + 1`` over ``group`` at learning rate ``lr``."""
        cfg, env, engine = self.cfg, self.env, self.engine
        self.stage.before_step(engine, step)
        set_lr(engine.optimizer, lr)
        skipped_before = engine.skipped_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        loss_count = torch.zeros((), dtype=torch.float64, device=env.device)
        dropped, grad_norm = False, None
        for micro, batch in enumerate(group):
            torch.manual_seed(derive_seed(cfg.seed, TAG_DROP_PATH, step, env.rank, micro))
            with autocast(cfg.deepspeed.precision, env.device):
                loss = self.stage.loss(engine, batch, step, micro)
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach().double(), 0.0)
            loss_count += finite.double()
            engine.backward(loss * torch.where(finite, 1.0, float("nan")))
            if micro == len(group) - 1 and cfg.deepspeed.zero_stage == 0:
                grad_norm = zero0_grad_norm(engine.module, env.device)
                if not bool(grad_norm.isfinite()):  # sync: ZeRO-0 only, see the module's docstring
                    dropped = True  # AdamW skips parameters without gradients
                    for param in engine.module.parameters():
                        param.grad = None
            engine.step()
        skipped = dropped or engine.skipped_steps > skipped_before
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        return StepResult(loss_sum, loss_count, grad_norm, skipped)
