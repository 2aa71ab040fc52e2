"""Bit depth: every decoded image reaches the transforms as 8-bit RGB, whatever the depth of its file.

16-bit PNGs (and 16/32-bit integer TIFFs) decode to PIL modes ``I;16*``/``I`` or, through torchvision, to uint16
tensors. PIL's ``convert("RGB")`` clips such values at 255 (a 16-bit image turns almost white) and the transforms
are written for uint8, so both decoders scale them here: ``v * 255 / 65535``, rounded.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
"""PIL modes of integer images deeper than 8 bits (mode ``I`` holds 16-bit PNGs' values, 0..65535)."""


def _scale16(values: np.ndarray) -> np.ndarray:
    return ((values.astype(np.int64).clip(0, 65535) + 128) // 257).astype(np.uint8)


def pil_rgb8(image: PIL.Image.Image) -> PIL.Image.Image:
    """An RGB 8-bit copy of a decoded PIL image (16-bit values scaled, not clipped)."""
    if image.mode in WIDE_MODES:
        return PIL.Image.fromarray(_scale16(np.asarray(image)), mode="L").convert("RGB")
    return image.convert("RGB")


def tensor_rgb8(image: torch.Tensor) -> torch.Tensor:
    """A uint8 ``(3, H, W)`` tensor from torchvision's decoders (uint16 for 16-bit files: scaled)."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype != torch.uint16:
        raise TypeError(f"a decoded image of dtype {image.dtype}: expected uint8 or uint16")
    return ((image.to(torch.int32) + 128) // 257).to(torch.uint8)
