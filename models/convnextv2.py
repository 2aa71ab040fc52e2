"""ConvNeXt V2 (Woo et al., CVPR 2023): GRN blocks, no LayerScale, eight sizes from atto to huge.

Names follow the paper: ``stem``, ``stages[i].downsample``, ``stages[i].blocks[j]`` with ``dwconv``, ``norm``,
``pwconv1``, ``grn``, ``pwconv2``; the classifier is ``norm`` (on pooled features) + ``head``. Conversions from
timm's and the official release's layouts live in :mod:`models.checkpoints`.

Blocks run the depthwise conv channels-first and the rest channels-last (a permute of a ``channels_last``
tensor is free), so the model is friendly to ``torch.channels_last`` inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6
STEM_STRIDE = 4
GRN_EPS = 1e-6


@dataclass(frozen=True)
class ModelSize:
    """Depths and widths of one ConvNeXt V2 size."""

    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]


SIZES: dict[str, ModelSize] = {
    "atto": ModelSize((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ModelSize((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ModelSize((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ModelSize((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ModelSize((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ModelSize((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ModelSize((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ModelSize((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


def get_size(size: str) -> ModelSize:
    """Look up a size by name, with an error that lists the valid names."""
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"unknown ConvNeXt V2 size {size!r}; choose one of {', '.join(SIZES)}") from None


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on channels-last input ``(N, *spatial, C)``.

    ``Gx`` is the L2 norm over all spatial positions of a sample, ``Nx = Gx / (mean_c Gx + eps)``, and
    ``out = gamma * (x * Nx) + beta + x``. ``visible`` (``(N, *spatial, 1)``, 1 = visible) restricts the
    statistics to visible positions, which is what a masked encoder needs: masked cells must not vote.
    """

    def __init__(self, dim: int, eps: float = GRN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        spatial = tuple(range(1, x.ndim - 1))
        stats_input = x if visible is None else x * visible
        gx = torch.linalg.vector_norm(stats_input, ord=2, dim=spatial, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return x + torch.addcmul(self.beta, self.gamma, x * nx)


BlockKind = Literal["v2", "v1"]
Grouping = Literal["block", "stage"]
"""Layer grouping for layer-wise lr decay: one layer per block, or the paper's groups (base and up)."""
BLOCKS_PER_GROUP = 3  # the paper groups stage 3 (index 2) of base/large/huge by three blocks
LAYER_SCALE_INIT = 1e-6


class Block(nn.Module):
    """ConvNeXt V2 block: dwconv 7x7 -> LN -> Linear(4C) -> GELU -> GRN -> Linear(C) -> drop path, residual.

    ``kind="v1"`` builds the ConvNeXt V1 block instead (no GRN, LayerScale on the output, initialized to 1e-6):
    only for the paper's GRN ablation.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, kind: BlockKind = "v2") -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim) if kind == "v2" else None
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT)) if kind == "v1" else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def mlp(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """The channels-last part of the block (LN, MLP, GRN) on ``(N, *positions, C)``."""
        x = self.norm(x)
        x = self.pwconv1(x)
        x = self.act(x)
        if self.grn is not None:
            x = self.grn(x, visible)
        x = self.pwconv2(x)
        return x * self.layer_scale if self.layer_scale is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.mlp(y).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class Stem(nn.Module):
    """4x4 conv with stride 4, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=STEM_STRIDE, stride=STEM_STRIDE)
        self.norm = LayerNorm2d(dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Downsample(nn.Module):
    """LayerNorm, then 2x2 conv with stride 2."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=LN_EPS)
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


class Stage(nn.Module):
    """A downsample (identity for the first stage) followed by blocks of one width."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: list[float], block: BlockKind = "v2") -> None:
        super().__init__()
        self.downsample: Downsample | None = Downsample(in_dim, dim) if in_dim != dim else None
        self.blocks = nn.Sequential(*[Block(dim, dp, block) for dp in drop_paths[:depth]])
        self.grad_checkpointing = False

    def run(self, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
        """``fn(*args)`` for one block of this stage; with ``grad_checkpointing`` (and autograd on) its
        activations are not kept but recomputed in backward (non-reentrant: the RNG state of drop path is
        replayed, so the gradients are those of the plain call)."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return cast(torch.Tensor, checkpoint(fn, *args, use_reentrant=False))
        return fn(*args)

    def iter_blocks(self) -> Iterator[Block]:
        """The blocks, typed."""
        for block in self.blocks:
            yield cast(Block, block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.iter_blocks():
            x = self.run(block, x)
        return x


def init_weights(module: nn.Module) -> None:
    """The paper's init: truncated normal (std 0.02) for conv and linear weights, zero biases."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNeXtV2Encoder(nn.Module):
    """Stem and four stages: the part FCMAE pretrains. ``forward`` returns the last stage's NCHW features."""

    def __init__(
        self,
        depths: tuple[int, ...],
        dims: tuple[int, ...],
        drop_path: float = 0.0,
        in_chans: int = 3,
        block: BlockKind = "v2",
    ) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt V2 has 4 stages; got depths={depths} dims={dims}")
        self.depths = tuple(depths)
        self.dims = tuple(dims)
        # Stochastic depth grows linearly with block index, as in the paper.
        total = sum(depths)
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        self.stem = Stem(in_chans, dims[0])
        stages = []
        start = 0
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            in_dim = dims[i - 1] if i > 0 else dim
            stages.append(Stage(in_dim, dim, depth, rates[start : start + depth], block))
            start += depth
        self.stages = nn.ModuleList(stages)
        self.apply(init_weights)

    @property
    def num_features(self) -> int:
        """Channels of the last stage."""
        return self.dims[-1]

    def set_grad_checkpointing(self, enabled: bool | Sequence[bool]) -> None:
        """Activation checkpointing for all stages (a bool) or per stage (four bools): a checkpointed stage keeps
        only each block's input for backward and recomputes the rest."""
        flags = [enabled] * len(self.stages) if isinstance(enabled, bool) else list(enabled)
        if len(flags) != len(self.stages):
            raise ValueError(f"grad_checkpointing needs one flag per stage ({len(self.stages)}), got {flags}")
        for stage, flag in zip(self.iter_stages(), flags, strict=True):
            stage.grad_checkpointing = bool(flag)

    @property
    def feature_levels(self) -> tuple[tuple[int, int], ...]:
        """``(channels, stride)`` of each stage's output: the levels a detector's feature pyramid is built on."""
        return tuple((dim, STEM_STRIDE * 2**i) for i, dim in enumerate(self.dims))

    def num_layers(self, grouping: Grouping) -> int:
        """Layer ids of the trunk for layer-wise lr decay; a head above it is layer ``num_layers + 1``."""
        if grouping == "block":
            return sum(self.depths)
        return 3 + -(-self.depths[2] // BLOCKS_PER_GROUP)

    def layer_ids(self, grouping: Grouping) -> dict[str, int]:
        """The layer id of every trunk parameter (by its name in this module), as the official code numbers them.

        - ``block`` (the official ``single`` type, atto..tiny): block ``j`` of stage ``i`` is
          ``sum(depths[:i]) + j + 1``; a downsample shares the id of its stage's first block, the stem id 1 with the
          first block (the official code leaves 0 unused).
        - ``stage`` (the official ``group`` type, base/large/huge): stem 0, stage 0 -> 1, stage 1 and its downsample
          -> 2, stage 2 in groups of three blocks from 3 (its downsample with the first group), stage 3 and its
          downsample last: for depths (3, 3, 27, 3) the paper's 12 layers.
        """
        top = self.num_layers(grouping)

        def block_id(stage: int, block: int) -> int:
            if grouping == "block":
                return sum(self.depths[:stage]) + block + 1
            if stage < 2:
                return stage + 1
            return 3 + block // BLOCKS_PER_GROUP if stage == 2 else top

        ids = {f"stem.{name}": 1 if grouping == "block" else 0 for name, _ in self.stem.named_parameters()}
        for i, stage in enumerate(self.iter_stages()):
            if stage.downsample is not None:
                ids.update(
                    {f"stages.{i}.downsample.{n}": block_id(i, 0) for n, _ in stage.downsample.named_parameters()}
                )
            for j, block in enumerate(stage.iter_blocks()):
                ids.update({f"stages.{i}.blocks.{j}.{n}": block_id(i, j) for n, _ in block.named_parameters()})
        return ids

    def iter_stages(self) -> Iterator[Stage]:
        """The four stages, typed."""
        for stage in self.stages:
            yield cast(Stage, stage)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Dense trunk: image ``(N, 3, H, W)`` to last-stage features ``(N, C, H/32, W/32)``."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class ConvNeXtV2(ConvNeXtV2Encoder):
    """ConvNeXt V2 classifier: trunk, global average pool, LayerNorm, linear head.

    With ``num_classes=0`` the head is the identity and ``forward`` returns normalized pooled features.
    """

    def __init__(
        self,
        depths: tuple[int, ...],
        dims: tuple[int, ...],
        num_classes: int = 1000,
        drop_path: float = 0.0,
        in_chans: int = 3,
        head_init_scale: float = 1.0,
        block: BlockKind = "v2",
    ) -> None:
        super().__init__(depths, dims, drop_path=drop_path, in_chans=in_chans, block=block)
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.head: nn.Module = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            init_weights(self.head)
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    def layer_ids(self, grouping: Grouping) -> dict[str, int]:
        """Trunk layer ids (:meth:`ConvNeXtV2Encoder.layer_ids`), and the classifier (``norm``, ``head``) above them
        at ``num_layers + 1``: it trains at the full lr."""
        top = self.num_layers(grouping)
        ids = super().layer_ids(grouping)
        for module_name in ("norm", "head"):
            ids.update({f"{module_name}.{n}": top + 1 for n, _ in getattr(self, module_name).named_parameters()})
        return ids

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pool ``(N, C, h, w)`` features, normalize and classify."""
        return self.head(self.norm(features.mean(dim=(-2, -1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build(size: str, num_classes: int = 1000, drop_path: float = 0.0, block: BlockKind = "v2") -> ConvNeXtV2:
    """Build a ConvNeXt V2 classifier of a named size (``atto`` ... ``huge``); ``block="v1"``: ConvNeXt V1 blocks
    (LayerScale, no GRN), the classifier of the paper's V1 ablation."""
    spec = get_size(size)
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 gives pooled features), got {num_classes}")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
    return ConvNeXtV2(spec.depths, spec.dims, num_classes=num_classes, drop_path=drop_path, block=block)


def build_encoder(size: str, drop_path: float = 0.0, block: BlockKind = "v2") -> ConvNeXtV2Encoder:
    """Build the trunk of a named size, without the classifier norm and head (what FCMAE trains)."""
    spec = get_size(size)
    return ConvNeXtV2Encoder(spec.depths, spec.dims, drop_path=drop_path, block=block)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for parameters that take no weight decay: biases, norm weights and GRN gamma/beta."""
    return param.ndim <= 1 or name.endswith(".gamma") or name.endswith(".beta")
