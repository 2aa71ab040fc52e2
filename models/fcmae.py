"""FCMAE: the fully convolutional masked autoencoder that pretrains ConvNeXt V2.

60% of the 32-px patches of each image are masked; a sparse encoder sees only the visible ones; one ConvNeXt V2
block decodes at 1/32 resolution, with a learned mask token in the masked cells; a 1x1 conv predicts each
patch's pixels. The loss is the MSE on per-patch normalized pixels, over masked patches only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.convnextv2 import Block, BlockKind, build_encoder, get_size, init_weights
from models.masked_encoder import BACKENDS, check_backend
from models.masking import check_visible, count_visible, num_visible, random_mask

ENCODER_STRIDE = 32
NORM_PIX_EPS = 1e-6


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, L, p*p*3)``: patches row-major, values in (row, column, channel) order."""
    n, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(N, L, p*p*3)`` -> ``(N, 3, H, W)``."""
    n = patches.shape[0]
    p = patch_size
    x = patches.reshape(n, grid_h, grid_w, p, p, 3)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, 3, grid_h * p, grid_w * p)


def normalized_pixel_target(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patchified image with each patch normalized to zero mean, unit (unbiased) variance."""
    target = patchify(imgs, patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + NORM_PIX_EPS) ** 0.5


class FCMAE(nn.Module):
    """ConvNeXt V2 FCMAE: ``forward(imgs, mask=None, generator=None, visible=None) -> (loss, pred, mask)``.

    ``mask`` is ``(N, L)`` with 1 = masked over the row-major patch grid; a given mask is used as is, otherwise
    one is drawn with ``mask_ratio`` (from ``generator`` when given). ``pred`` is ``(N, L, patch_size**2 * 3)``.
    ``sparse=False`` and ``block="v1"`` exist for the paper's ablations: dense convolutions on the masked image,
    and ConvNeXt V1 blocks (LayerScale, no GRN).
    """

    def __init__(
        self,
        size: str,
        mask_ratio: float = 0.6,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
        backend: str = "gather",
        patch_size: int = 32,
        drop_path: float = 0.0,
        block: BlockKind = "v2",
        sparse: bool = True,
        grad_checkpointing: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__()
        get_size(size)
        check_backend(backend)
        if patch_size != ENCODER_STRIDE:
            raise ValueError(
                f"patch_size must equal the encoder's total stride ({ENCODER_STRIDE}): the decoder predicts one "
                f"patch per 1/32 cell; got {patch_size}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if decoder_depth < 1 or decoder_dim < 1:
            raise ValueError(f"decoder_depth and decoder_dim must be >= 1, got {decoder_depth}, {decoder_dim}")
        self.size = size
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.norm_pix_loss = norm_pix_loss
        self.sparse = sparse
        self._backend = backend
        self.encoder = build_encoder(size, drop_path=drop_path, block=block)
        self.encoder.set_grad_checkpointing(grad_checkpointing)
        self.proj = nn.Conv2d(self.encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, patch_size**2 * 3, kernel_size=1)
        for module in (self.proj, self.pred, self.decoder):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def backend(self) -> str:
        """Name of the sparse encoder backend (see :mod:`models.masked_encoder`)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        check_backend(name)
        self._backend = name

    def grid_size(self, imgs: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image batch; raises if the size is not a multiple of the patch size."""
        if imgs.ndim != 4 or imgs.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(imgs.shape)}")
        h, w = imgs.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {p}; resize or crop to a multiple "
                f"of {p} (e.g. {max(p, h // p * p)}x{max(p, w // p * p)})"
            )
        return h // p, w // p

    def visible_patches(self, grid_h: int, grid_w: int) -> int:
        """Visible patches per sample of the masks this model draws on a ``grid_h x grid_w`` grid."""
        return num_visible(grid_h * grid_w, self.mask_ratio)

    def random_mask(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw a ``(N, L)`` mask for a batch with this model's ratio."""
        grid_h, grid_w = self.grid_size(imgs)
        return random_mask(imgs.shape[0], grid_h * grid_w, self.mask_ratio, generator, device=imgs.device)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor, visible: int | None = None) -> torch.Tensor:
        """Sparse encoder: last-stage features ``(N, C, h, w)``, zero on masked cells.

        ``visible`` is the number of visible patches of every sample. The training step passes it (it knows how
        its masks were drawn) and the count is then only asserted on the device; without it the mask is read
        to find it, a wait for the device that a training step must not make.
        """
        grid_h, grid_w = self.grid_size(imgs)
        if mask.shape != (imgs.shape[0], grid_h * grid_w):
            raise ValueError(
                f"mask must have shape (N, L) = {(imgs.shape[0], grid_h * grid_w)} for images "
                f"{tuple(imgs.shape)}, got {tuple(mask.shape)}"
            )
        if visible is None:
            visible = count_visible(mask)
        else:
            check_visible(mask, visible)
        if not self.sparse:
            # The paper's ablation: dense convolutions over the image with masked patches zeroed. Features of
            # visible cells then see the zeros (and, after a few 7x7 convs, their neighbours' biases).
            pixels = 1.0 - mask.to(imgs.dtype).reshape(-1, 1, grid_h, grid_w)
            pixels = pixels.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)
            return self.encoder.forward_features(imgs * pixels)
        return BACKENDS[self._backend](self.encoder, imgs, mask.to(imgs.dtype), grid_h, grid_w, visible)

    def forward_decoder(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decode features to per-patch pixel predictions ``(N, L, p*p*3)``."""
        x = self.proj(features)
        n, _, h, w = x.shape
        cell_mask = mask.reshape(n, 1, h, w).to(x.dtype)
        x = x * (1.0 - cell_mask) + self.mask_token.to(x.dtype) * cell_mask
        x = self.pred(self.decoder(x))
        return x.flatten(2).transpose(1, 2)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch MSE, averaged over masked patches (0 when nothing is masked)."""
        if self.norm_pix_loss:
            target = normalized_pixel_target(imgs.float(), self.patch_size)
        else:
            target = patchify(imgs.float(), self.patch_size)
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self,
        imgs: torch.Tensor,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        visible: int | None = None,
        train_encoder: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``train_encoder=False`` runs the encoder without autograd (a decoder warm-up): only the decoder side gets
        gradients, and the encoder's activations are not kept for a backward."""
        if mask is None:
            mask = self.random_mask(imgs, generator)
            visible = self.visible_patches(*self.grid_size(imgs))
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            features = self.forward_encoder(imgs, mask, visible)
        pred = self.forward_decoder(features, mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder weights in the layout ``build(size, num_classes=0)`` loads strictly.

        The classifier's ``norm`` is not pretrained; it is given its initial value (ones, zeros), which is what
        fine-tuning from an FCMAE checkpoint starts from.
        """
        state = {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}
        width = self.encoder.num_features
        state["norm.weight"] = torch.ones(width)
        state["norm.bias"] = torch.zeros(width)
        return state
