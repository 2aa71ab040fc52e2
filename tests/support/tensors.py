"""Tensor helpers: random parameters that expose bugs, relative error."""

from __future__ import annotations

import torch
from torch import nn


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values (GRN gamma/beta start at zero, which would hide GRN bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 0.5 if param.ndim <= 1 else 0.2
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * scale
            if name.endswith(("norm.weight", "ln.weight")):
                noise = noise + 1.0
            param.copy_(noise.to(param.dtype))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
