"""AdamW with the paper's no-decay groups, layer-wise lr decay, and the run's schedule: steps per epoch and in all,
the global batch and the per-step lr (warmup + cosine, :class:`Schedule`).

Layer-wise lr decay scales each parameter's lr by ``layer_decay ** (num_layers + 1 - layer_id)``. The model declares
the layer ids (:meth:`models.convnextv2.ConvNeXtV2Encoder.layer_ids`, the detector's
:func:`models.detection.layer_ids`); what sits above the trunk (the classifier, the detector's FPN and heads) is
layer ``num_layers + 1`` and trains at the full lr, earlier layers ever slower.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.convnextv2 import no_weight_decay
from trainer.config import OptimConfig, TrainConfig
from trainer.resilience.failure import TrainingError

log = logging.getLogger(__name__)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
    part: Callable[[str], str] | None = None,
) -> list[dict]:
    """Split trainable parameters into decay / no-decay groups (and by ``lr_scale(name)`` and ``part(name)`` when
    given).

    Biases, norm weights and GRN gamma/beta take no weight decay. ``lr_scale`` (layer-wise lr decay in
    fine-tuning) multiplies the scheduled lr of a group; the scale is stored as ``lr_scale`` in the group.
    ``part`` names the part of the model a parameter belongs to (``"encoder"``, ``"decoder"``), stored as ``part``:
    parts that never share a group can be frozen and restarted apart (:func:`freeze_part`, :func:`restart_part`).
    """
    groups: dict[tuple[bool, float, str], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not no_weight_decay(name, param)
        scale = lr_scale(name) if lr_scale is not None else 1.0
        where = part(name) if part is not None else ""
        group = groups.setdefault(
            (decay, scale, where),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "part": where,
                "frozen": False,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def lr_scales(layer_ids: Mapping[str, int], num_layers: int, layer_decay: float) -> Callable[[str], float]:
    """``lr_scale(name)`` for :func:`build_optimizer` (layer-wise lr decay); a parameter without a layer id is an
    error."""

    def scale(name: str) -> float:
        if name not in layer_ids:
            raise ValueError(f"parameter {name!r} has no layer id for layer-wise lr decay")
        return float(layer_decay ** (num_layers + 1 - layer_ids[name]))

    return scale


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    lr_scale: Callable[[str], float] | None = None,
    part: Callable[[str], str] | None = None,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the lr is set every step by :func:`set_lr`."""
    groups = _unnamed(param_groups(model, cfg.weight_decay, lr_scale, part))
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas, eps=cfg.eps)


def build_sgd(model: nn.Module, cfg: OptimConfig, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD with momentum over :func:`param_groups` (the trainable parameters only): the linear probe's optimizer,
    as MoCo's and SimCLR's linear evaluations use at ordinary batch sizes (MAE's LARS only pays at 16k)."""
    return torch.optim.SGD(_unnamed(param_groups(model, cfg.weight_decay)), lr=0.0, momentum=momentum)


def _unnamed(groups: list[dict]) -> list[dict]:
    """The groups as a torch optimizer takes them: without the parameter names (kept for inspection only)."""
    for group in groups:
        group.pop("names")
    return groups


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``peak_lr``, then cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply a scheduled lr to every group, times the group's ``lr_scale``; a ``frozen`` group gets 0 (AdamW then
    changes nothing, weight decay included)."""
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if group.get("frozen") else lr * group.get("lr_scale", 1.0)


def freeze_part(optimizer: Any, part: str, frozen: bool) -> None:
    """Mark the groups of ``part`` (see :func:`param_groups`) frozen or not, for :func:`set_lr`. ``optimizer``: the
    client optimizer or the DeepSpeed engine's, which exposes the client's groups."""
    for group in optimizer.param_groups:
        if group.get("part") == part:
            group["frozen"] = frozen


def restart_part(optimizer: Any, part: str) -> int:
    """Forget the AdamW state (moments and step count) of ``part``'s groups, so that its next step is the first of a
    fresh optimizer; returns the number of state entries reset. Finds the tensors the state is kept for under every
    DeepSpeed optimizer: the client's own parameters (ZeRO-0, fp32), a flat fp32 partition per group (ZeRO-1/2, the
    bf16 optimizer) or per sub-group (ZeRO-3, whose groups list their partitions only during a step)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    groups = [i for i, group in enumerate(inner.param_groups) if group.get("part") == part]
    keys: list[torch.Tensor] = [p for i in groups for p in inner.param_groups[i]["params"]]
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flats is not None:
        keys += [flat for sub, flat in enumerate(flats) if optimizer.sub_group_to_group_id[sub] in groups]
    reset = 0
    for key in keys:
        state = inner.state.get(key)
        if state:
            for name, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.zero_()
                else:
                    state[name] = type(value)(0)
            reset += 1
    return reset


@dataclass(frozen=True)
class Schedule:
    """The run's steps on this world size: ``accum`` micro-batches a step, ``steps_per_epoch`` steps an epoch,
    ``total`` in all (the first ``warmup`` warm up), ``global_batch`` samples a step, the lr peaking at
    ``peak_lr`` (scaled with the global batch)."""

    accum: int
    steps_per_epoch: int
    total: int
    warmup: int
    global_batch: int
    peak_lr: float
    min_lr: float

    @classmethod
    def of(cls, cfg: TrainConfig, batches_per_epoch: int, world_size: int) -> Schedule:
        """The schedule of ``cfg`` for a loader of ``batches_per_epoch`` batches per rank."""
        accum = cfg.deepspeed.grad_accum
        steps_per_epoch = batches_per_epoch // accum
        if steps_per_epoch == 0:
            raise TrainingError(
                f"{batches_per_epoch} batches per epoch cannot fill one step of deepspeed.grad_accum={accum}: "
                "lower data.batch_size or deepspeed.grad_accum"
            )
        return cls(
            accum=accum,
            steps_per_epoch=steps_per_epoch,
            total=cfg.total_steps(steps_per_epoch),
            warmup=round(cfg.schedule.warmup_epochs * steps_per_epoch),
            global_batch=cfg.global_batch(world_size),
            peak_lr=cfg.lr(world_size),
            min_lr=cfg.optim.min_lr,
        )

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        return lr_at(step, self.total, self.warmup, self.peak_lr, self.min_lr)

    def progress(self, epoch: int, step: int) -> float:
        """Epochs done after ``step`` steps, in ``epoch``: 1.0 ends epoch 0."""
        return epoch + ((step - 1) % self.steps_per_epoch + 1) / self.steps_per_epoch

    def check_resumed(self, saved_global_batch: int) -> None:
        """Say so when the checkpoint a run resumes from was written with another global batch."""
        if saved_global_batch != self.global_batch:
            log.warning(
                "global batch changed from %d to %d on resume: the lr is rescaled and steps per epoch change",
                saved_global_batch, self.global_batch,
            )  # fmt: skip

    def describe(self, batch_size: int, world_size: int) -> str:
        """One line of the run's start banner."""
        return (
            f"world {world_size} | global batch {self.global_batch} ({batch_size} x {self.accum} accum x "
            f"{world_size} ranks) | lr {self.peak_lr:.3g} | {self.steps_per_epoch} steps/epoch | {self.total} steps"
        )
