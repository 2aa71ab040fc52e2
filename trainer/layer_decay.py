"""Layer-wise learning-rate decay for fine-tuning ConvNeXt V2, with the layer ids of the official code.

Each parameter gets a layer id; its lr is scaled by ``layer_decay ** (num_layers + 1 - layer_id)``, so the
classifier (``norm``, ``head``: id ``num_layers + 1``) trains at the full lr and earlier layers ever slower.

- ``block`` (the official ``single`` type, atto..tiny): one id per block, ``num_layers = sum(depths)``. Block ``j``
  of stage ``i`` is ``sum(depths[:i]) + j + 1``; a downsample shares the id of its stage's first block, and the
  stem shares id 1 with the first block (as the official code: id 0 is unused).
- ``stage`` (the official ``group`` type, base/large/huge): stem 0, stage 0 -> 1, stage 1 and its downsample -> 2,
  stage 2 in groups of three blocks from 3 (its downsample with the first group), stage 3 and its downsample last.
  For depths (3, 3, 27, 3) that is the paper's 12 layers; other depths group stage 2 the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Literal

Grouping = Literal["block", "stage"]

_BLOCKS_PER_GROUP = 3  # the paper groups stage 3 (index 2) of base/large/huge by three blocks


def num_layers(depths: Sequence[int], grouping: Grouping) -> int:
    """Layer ids below the classifier: the classifier's id is ``num_layers + 1``."""
    if grouping == "block":
        return sum(depths)
    return 3 + -(-depths[2] // _BLOCKS_PER_GROUP)


def layer_id(name: str, depths: Sequence[int], grouping: Grouping) -> int:
    """Layer id of a parameter of :class:`models.convnextv2.ConvNeXtV2` (this project's key layout)."""
    top = num_layers(depths, grouping)
    if name.startswith(("norm.", "head.")):
        return top + 1
    if name.startswith("stem."):
        return 1 if grouping == "block" else 0
    match = re.match(r"stages\.(\d)\.(downsample|blocks\.(\d+))\.", name)
    if match is None:
        raise ValueError(f"parameter {name!r} is not part of a ConvNeXt V2 classifier: no layer id for lr decay")
    stage = int(match[1])
    block = int(match[3]) if match[3] is not None else 0  # a downsample goes with its stage's first block
    if grouping == "block":
        return sum(depths[:stage]) + block + 1
    if stage < 2:
        return stage + 1
    if stage == 2:
        return 3 + block // _BLOCKS_PER_GROUP
    return top


def lr_scales(depths: Sequence[int], layer_decay: float, grouping: Grouping) -> Callable[[str], float]:
    """``lr_scale(name)`` for :func:`trainer.optim.build_optimizer`: ``layer_decay ** (num_layers + 1 - id)``."""
    top = num_layers(depths, grouping)

    def scale(name: str) -> float:
        return float(layer_decay ** (top + 1 - layer_id(name, depths, grouping)))

    return scale
