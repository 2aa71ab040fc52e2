"""Masked (sparse) forward passes of a :class:`ConvNeXtV2Encoder`, the encoder half of FCMAE.

All backends run the same module parameters and are numerically interchangeable: given an image and a patch
mask they return the last-stage features ``(N, C, h, w)`` with masked cells exactly zero, and no masked pixel
can influence a visible feature.

- ``dense_masked``: the readable reference. Dense ops with the mask re-applied after the stem, around every
  depthwise conv, inside GRN's statistics and before every downsample. Masking once after the stem is not
  enough: a 7x7 conv leaks masked cells into visible ones.
- ``gather`` (default): the depthwise conv runs dense on a zero-filled grid, LayerNorm + MLP + GRN run only on
  the gathered visible cells (the MLP is most of the FLOPs). Every sample keeps the same number of cells, so
  visible tokens stay a dense ``(N, cells, C)`` tensor and GRN statistics stay per sample.
- ``minkowski``: MinkowskiEngine sparse tensors; only when MinkowskiEngine is importable.

Why downsampling never mixes masked and visible cells: patches are 32 px and every downsample is a 2x2 conv
aligned to the 32-px grid, so each output cell reads one patch only.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.convnextv2 import Block, ConvNeXtV2Encoder
from models.masking import mask_grid, visible_rows

EncoderFn = Callable[[ConvNeXtV2Encoder, torch.Tensor, torch.Tensor, int, int, int], torch.Tensor]
"""``(encoder, imgs, mask, grid_h, grid_w, keep) -> features``; ``keep``: visible patches per sample."""


def encode_dense_masked(
    encoder: ConvNeXtV2Encoder, imgs: torch.Tensor, mask: torch.Tensor, grid_h: int, grid_w: int, keep: int
) -> torch.Tensor:
    """Reference masked encoder: dense ops, mask re-applied wherever information could cross cells."""
    x = encoder.stem(imgs)
    scale = x.shape[-2] // grid_h
    for stage in encoder.iter_stages():
        if stage.downsample is not None:
            visible = 1.0 - mask_grid(mask, grid_h, grid_w, scale).to(x.dtype)
            # LayerNorm turns a zero cell into its bias: re-mask between the norm and the conv.
            x = stage.downsample.conv(stage.downsample.norm(x) * visible)
            scale //= 2
        visible = 1.0 - mask_grid(mask, grid_h, grid_w, scale).to(x.dtype)
        visible_nhwc = visible.permute(0, 2, 3, 1)
        x = x * visible
        for block in stage.iter_blocks():
            x = stage.run(functools.partial(_dense_masked_block, block), x, visible, visible_nhwc)
    return x


def _dense_masked_block(
    block: Block, x: torch.Tensor, visible: torch.Tensor, visible_nhwc: torch.Tensor
) -> torch.Tensor:
    y = block.dwconv(x) * visible
    y = block.mlp(y.permute(0, 2, 3, 1), visible=visible_nhwc).permute(0, 3, 1, 2)
    return (x + block.drop_path(y)) * visible


def _scatter(tokens: torch.Tensor, rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Visible tokens ``(N, cells, C)`` -> zero-filled NCHW grid (channels_last in memory)."""
    c = tokens.shape[-1]
    grid = tokens.new_zeros(n * h * w, c).index_copy(0, rows, tokens.reshape(-1, c))
    return grid.view(n, h, w, c).permute(0, 3, 1, 2)


def _gather(x: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """NCHW grid -> visible tokens ``(N, cells, C)``."""
    c = x.shape[1]
    flat = x.permute(0, 2, 3, 1).reshape(-1, c)
    return flat.index_select(0, rows).view(n, -1, c)


def encode_gather(
    encoder: ConvNeXtV2Encoder, imgs: torch.Tensor, mask: torch.Tensor, grid_h: int, grid_w: int, keep: int
) -> torch.Tensor:
    """Masked encoder that runs LayerNorm, MLP and GRN on the visible cells only. Every index has a size fixed
    by ``keep`` (no ``nonzero``): the step never waits for the device and the shapes stay static for
    ``torch.compile``."""
    n = imgs.shape[0]
    stem = encoder.stem
    x = stem.conv(imgs)
    h, w = x.shape[-2:]
    scale = h // grid_h
    # The mask may live elsewhere than the features (a CPU mask for meta-device memory planning).
    rows = visible_rows(mask.to(x.device), grid_h, grid_w, scale, keep)
    tokens = _gather(x, rows, n)
    tokens = F.layer_norm(tokens, stem.norm.normalized_shape, stem.norm.weight, stem.norm.bias, stem.norm.eps)
    for stage in encoder.iter_stages():
        if stage.downsample is not None:
            norm = stage.downsample.norm
            tokens = F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            x = stage.downsample.conv(_scatter(tokens, rows, n, h, w))
            h, w = x.shape[-2:]
            scale //= 2
            rows = visible_rows(mask.to(x.device), grid_h, grid_w, scale, keep)
            tokens = _gather(x, rows, n)
        for block in stage.iter_blocks():
            tokens = stage.run(functools.partial(_gather_block, block, n=n, h=h, w=w), tokens, rows)
    return _scatter(tokens, rows, n, h, w)


def _gather_block(block: Block, tokens: torch.Tensor, rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    y = _gather(block.dwconv(_scatter(tokens, rows, n, h, w)), rows, n)
    return tokens + block.drop_path(block.mlp(y))


@functools.cache
def minkowski_available() -> bool:
    """Whether MinkowskiEngine imports in this environment (an installed but broken build counts as absent)."""
    if importlib.util.find_spec("MinkowskiEngine") is None:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "compiled with CPU_ONLY"
            import MinkowskiEngine  # noqa: F401
    except Exception:
        return False
    return True


def encode_minkowski(
    encoder: ConvNeXtV2Encoder, imgs: torch.Tensor, mask: torch.Tensor, grid_h: int, grid_w: int, keep: int
) -> torch.Tensor:
    """MinkowskiEngine sparse encoder (GRN per sample, unlike the official code's batch-wide sparse GRN)."""
    from models.minkowski_encoder import encode_minkowski as _encode

    return _encode(encoder, imgs, mask, grid_h, grid_w, keep)


BACKENDS: dict[str, EncoderFn] = {
    "dense_masked": encode_dense_masked,
    "gather": encode_gather,
    "minkowski": encode_minkowski,
}


def check_backend(name: str) -> None:
    """Raise a clear error if a backend is unknown or cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown encoder backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "minkowski" and not minkowski_available():
        raise RuntimeError(
            "encoder backend 'minkowski' needs MinkowskiEngine, which is not installed. Install it on a GPU "
            "machine (https://github.com/NVIDIA/MinkowskiEngine: `pip install MinkowskiEngine` with CUDA and "
            "OpenBLAS present), or use backend='gather' (default, same numbers, no sparse library)."
        )
