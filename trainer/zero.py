"""ZeRO-3 helpers: full parameters for code that runs outside the engine's forward (evaluation, export)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn


@contextlib.contextmanager
def gathered_parameters(model: nn.Module, engine: Any) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters on every rank for the body (a collective: all ranks must enter);
    a no-op for stages 0-2, where every rank holds full parameters."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    from deepspeed import zero

    with zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
