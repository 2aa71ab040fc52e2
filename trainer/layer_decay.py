"""Layer-wise learning-rate decay: each parameter's lr is scaled by ``layer_decay ** (num_layers + 1 - layer_id)``.

The model declares the layer ids (:meth:`models.convnextv2.ConvNeXtV2Encoder.layer_ids`, the detector's
:func:`models.detection.layer_ids`); what sits above the trunk (the classifier, the detector's FPN and heads) is
layer ``num_layers + 1`` and trains at the full lr, earlier layers ever slower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping


def lr_scales(layer_ids: Mapping[str, int], num_layers: int, layer_decay: float) -> Callable[[str], float]:
    """``lr_scale(name)`` for :func:`trainer.optim.build_optimizer`; a parameter without a layer id is an error."""

    def scale(name: str) -> float:
        if name not in layer_ids:
            raise ValueError(f"parameter {name!r} has no layer id for layer-wise lr decay")
        return float(layer_decay ** (num_layers + 1 - layer_ids[name]))

    return scale
