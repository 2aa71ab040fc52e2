"""The DeepSpeed engine: our config section -> a DeepSpeed config dict -> ``deepspeed.initialize``."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from trainer.config import DeepSpeedConfig, OptimConfig


def deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for one run."""
    if ds.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("deepspeed.precision=fp16 needs CUDA (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "train_batch_size": micro_batch * ds.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip or 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": ds.zero_stage},
        # Non-finite gradients make DeepSpeed skip the step (also in bf16).
        "bf16": {"enabled": ds.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
    }
    if ds.zero_stage > 0:
        # On CPU, ZeRO-1/2 can drop gradient buckets unless gradients are contiguous (DeepSpeed #8382).
        config["zero_optimization"].update(contiguous_gradients=True, overlap_comm=torch.cuda.is_available())
    if ds.offload_optimizer:
        if ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return _merge(config, ds.overrides)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """Wrap model and optimizer in a DeepSpeed engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def zero0_grad_norm(module: nn.Module, device: torch.device) -> torch.Tensor:
    """The global gradient norm after the all-reduce (the same on every rank), one fused op over all gradients: NaN
    or Inf in any gradient makes it non-finite. DeepSpeed reports no norm under ZeRO-0 without clipping."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)


def autocast(precision: str, device: torch.device) -> Any:
    """bf16 autocast when the run is bf16 (CUDA or CPU: DeepSpeed holds the weights in bf16, the loader gives fp32
    images); a disabled context otherwise."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)
