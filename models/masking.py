"""FCMAE masks: random per-sample masks on the patch grid, and their views at each encoder stage.

A mask is a float tensor ``(N, L)`` over the ``h x w`` grid of patches in row-major order, 1 = masked. Every
sample keeps the same number of visible patches, ``int(L * (1 - ratio))``, as the official implementation.
"""

from __future__ import annotations

import torch


def num_visible(num_patches: int, ratio: float) -> int:
    """Visible patches per sample for a mask ratio (the official ``int(L * (1 - ratio))``)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    keep = int(num_patches * (1 - ratio))
    if keep < 1:
        raise ValueError(f"mask ratio {ratio} on {num_patches} patches leaves no visible patch; lower the ratio")
    return keep


def random_mask(
    batch: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random mask ``(batch, num_patches)``, 1 = masked, with exactly the same visible count in every row.

    Pass a ``generator`` seeded from the run seed and the position in the run to make masks reproducible across
    restarts; the noise is drawn on the CPU so the same seed gives the same mask on any device.
    """
    keep = num_visible(num_patches, ratio)
    noise = torch.rand(batch, num_patches, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    mask = torch.ones(batch, num_patches)
    mask.scatter_(1, ids_shuffle[:, :keep], 0.0)
    return mask.to(device) if device is not None else mask


def mask_grid(mask: torch.Tensor, grid_h: int, grid_w: int, scale: int) -> torch.Tensor:
    """Patch mask ``(N, L)`` -> pixel-cell mask ``(N, 1, grid_h * scale, grid_w * scale)``, 1 = masked."""
    n = mask.shape[0]
    grid = mask.reshape(n, 1, grid_h, grid_w)
    if scale == 1:
        return grid
    return grid.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def visible_rows(mask: torch.Tensor, grid_h: int, grid_w: int, scale: int, keep: int) -> torch.Tensor:
    """Row indices of the visible cells at one stage, into the ``(N * H * W)`` rows of a flattened NHWC map.

    ``keep`` is the number of visible patches per sample (every sample keeps the same number); the result holds
    ``N * keep * scale**2`` rows, sorted per sample in row-major order, so it reshapes to ``(N, cells)``. Its size
    comes from ``keep``, not from the mask's values: no device-to-host wait (a stable sort puts each sample's
    visible cells first, in order).
    """
    n = mask.shape[0]
    masked = mask_grid(mask, grid_h, grid_w, scale).flatten(1)  # N, HW; 1 = masked
    cells = masked.shape[1]
    order = torch.sort(masked, dim=1, stable=True).indices[:, : keep * scale * scale]
    offsets = torch.arange(n, device=mask.device).unsqueeze(1) * cells
    return (order + offsets).flatten()


def check_visible(mask: torch.Tensor, keep: int) -> None:
    """Assert, on the mask's device and without waiting for it, that every sample keeps ``keep`` patches (a
    wrong count would gather masked cells). On a GPU a failure is a device-side assert that ends the run."""
    torch._assert_async(
        (mask.shape[1] - mask.sum(dim=1) == keep).all(),
        f"every sample must keep exactly {keep} visible patches; pass masks drawn by random_mask",
    )


def count_visible(mask: torch.Tensor) -> int:
    """Visible patches per sample of a mask whose samples all keep the same number (reads the mask: use it on
    masks built by hand, not in the training step). Raises ``ValueError`` for ragged masks."""
    counts = (mask < 0.5).sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            "the masked encoder needs the same number of visible patches in every sample; "
            f"got {sorted(set(counts.tolist()))}"
        )
    return int(counts[0])
