"""What we look at during pretraining: reconstruction grids and the paper's feature cosine-distance statistic."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from models.fcmae import FCMAE, NORM_PIX_EPS, patchify, unpatchify

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def feature_cosine_distance(features: torch.Tensor) -> float:
    """Mean pairwise cosine distance between the channels of a feature map ``(N, C, H, W)``, averaged over N.

    As in the paper: each channel's ``H*W`` map is a vector; the statistic is ``mean_ij (1 - cos(X_i, X_j)) / 2``.
    Collapsed (redundant) channels give values near 0; diverse channels give larger values.
    """
    x = features.float().flatten(2)  # N, C, HW
    x = torch.nn.functional.normalize(x, dim=-1)
    cos = x @ x.transpose(1, 2)  # N, C, C
    return float(((1.0 - cos) / 2.0).mean())


@torch.no_grad()
def reconstruction_grid(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Rows of (original, masked, reconstruction with visible patches pasted back), in [0, 1] pixel space."""
    p = model.patch_size
    grid_h, grid_w = imgs.shape[-2] // p, imgs.shape[-1] // p
    target = patchify(imgs.float(), p)
    pred = pred.float()
    if model.norm_pix_loss:  # undo the per-patch normalization with the true patch statistics
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + NORM_PIX_EPS) ** 0.5 + mean
    m = mask.float().unsqueeze(-1)
    masked = unpatchify(target * (1 - m), p, grid_h, grid_w)
    recon = unpatchify(target * (1 - m) + pred * m, p, grid_h, grid_w)
    mean_t = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, 3, 1, 1)
    std_t = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, 3, 1, 1)
    rows = [(x * std_t + mean_t).clamp(0, 1) for x in (imgs.float(), masked, recon)]
    masked_gray = rows[1] + (mask_pixels(mask, p, grid_h, grid_w) * 0.5)
    rows[1] = masked_gray.clamp(0, 1)
    return torch.stack(rows, dim=1).flatten(0, 1)  # N*3 images: orig, masked, recon per sample


def mask_pixels(mask: torch.Tensor, patch: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Patch mask ``(N, L)`` -> pixel mask ``(N, 1, H, W)``."""
    grid = mask.float().reshape(-1, 1, grid_h, grid_w)
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def save_reconstructions(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, path: Path) -> Path:
    """Write the reconstruction grid (3 columns: original, masked, reconstruction) as a PNG."""
    images = reconstruction_grid(model, imgs, mask, pred).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow=3, padding=2, pad_value=1.0), path)
    return path
