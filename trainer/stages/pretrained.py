"""Loading ``model.pretrained``: our exports, timm's and the official release's ConvNeXt V2 weights, by path or URL.

The one place that reads pretrained weights for the fine-tuning and detection stages: a file that is missing, not a
state dict, or of another size is a :class:`PretrainedWeightsError` that says what to change.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from torchvision.models.detection import MaskRCNN

from data.storage import open_url
from models.checkpoints import infer_size, load_foreign
from models.convnextv2 import ConvNeXtV2
from models.detection import load_backbone


class PretrainedWeightsError(ValueError):
    """``model.pretrained`` cannot be used: missing, unreadable, or not a fit for the configured model."""


SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pth", ".pt")


def read_tensors(url: str, setting: str = "model.pretrained") -> dict[str, Any]:
    """The raw dict of a ``.safetensors`` or ``.pth``/``.pt`` file (torch.load with ``weights_only=True``) at a path
    or fsspec URL, in the layout its writer used; errors name ``setting``, the config key that gave the URL."""
    name = url.split("?", 1)[0].lower()
    if not name.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
        raise PretrainedWeightsError(
            f"{setting}={url!r}: expected a .safetensors (our export, timm) or .pth/.pt (official, timm) file"
        )
    try:
        with open_url(url) as f:
            data = f.read()
    except FileNotFoundError:
        raise PretrainedWeightsError(
            f"{setting}={url!r} does not exist: run the pretraining stage first (it writes export/model.safetensors) "
            f"or point {setting} at an existing checkpoint"
        ) from None
    except Exception as exc:  # the storage client's own errors: unreachable host, credentials, bad bucket
        raise PretrainedWeightsError(f"{setting}={url!r} cannot be read: {type(exc).__name__}: {exc}") from exc
    if name.endswith(SAFETENSORS_SUFFIXES):
        raw: Any = load_safetensors(data)
    else:
        try:
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler raises several types for non-tensor objects
            raise PretrainedWeightsError(
                f"{setting}={url!r} does not load with weights_only=True ({type(exc).__name__}: {exc}); "
                "re-save only its state dict, e.g. torch.save(ckpt['model'], 'weights.pth')"
            ) from exc
    if not isinstance(raw, dict):
        raise PretrainedWeightsError(f"{setting}={url!r} holds a {type(raw).__name__}, not a state dict")
    return raw


def read_checkpoint(url: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (:func:`read_tensors`) converted to this project's classifier layout from ours,
    timm's or the official release's."""
    try:
        return load_foreign(read_tensors(url))
    except (KeyError, ValueError) as exc:
        if isinstance(exc, PretrainedWeightsError):
            raise
        raise PretrainedWeightsError(f"model.pretrained={url!r}: {exc}") from exc


def load_pretrained(model: ConvNeXtV2, url: str, size: str) -> None:
    """Load ``url`` into ``model`` (built as ``size``): every key but ``head.*`` must be present with the
    model's shape; the file's head, if any, is ignored (the head is re-initialized for the new classes)."""
    state = {k: v for k, v in read_checkpoint(url).items() if not k.startswith("head.")}
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("head.")}
    problems = []  # in the model's order, so that the first one is the earliest layer that does not fit
    for key, shape in expected.items():
        if key not in state:
            problems.append(f"missing key {key!r}")
        elif state[key].shape != shape:
            problems.append(f"{key!r} has shape {tuple(state[key].shape)} in the file but {tuple(shape)} in the model")
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    if problems:
        try:
            found = infer_size(state)
        except (KeyError, ValueError):
            found = size
        hint = f"; the file holds ConvNeXt V2-{found} weights: set model.size={found}" if found != size else ""
        raise PretrainedWeightsError(
            f"model.pretrained={url!r} does not fit model.size={size!r}: {problems[0]} "
            f"({len(problems)} problem{'s' if len(problems) > 1 else ''}){hint}"
        )
    model.load_state_dict(state, strict=False)


def load_detector_backbone(detector: MaskRCNN, url: str, size: str) -> None:
    """Load ``url``'s ConvNeXt V2 trunk into the detector's backbone (exactly; heads and FPN start fresh)."""
    try:
        load_backbone(detector, read_checkpoint(url), size)
    except ValueError as exc:
        if isinstance(exc, PretrainedWeightsError):
            raise
        raise PretrainedWeightsError(f"model.pretrained={url!r}: {exc}") from exc
