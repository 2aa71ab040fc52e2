"""An independent implementation of the official ConvNeXt V2 release's modules and checkpoint layouts (dense and
FCMAE's sparse MinkowskiEngine keys), to test conversions against without downloading the released files."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.convnextv2 import SIZES
from tests.support.tensors import randomize_


class _OfficialLayerNorm(nn.Module):
    """The official release's LayerNorm: explicit mean/var for channels_first, F.layer_norm otherwise."""

    def __init__(self, dim: int, channels_first: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.channels_first = channels_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_first:
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-6)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _OfficialGRN(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class _OfficialBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = _OfficialLayerNorm(dim, channels_first=False)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = _OfficialGRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y))))
        return x + y.permute(0, 3, 1, 2)


class _OfficialConvNeXtV2(nn.Module):
    """An independent model in the official release's module names (downsample_layers, stages.i.j)."""

    def __init__(self, depths: tuple[int, ...], dims: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), _OfficialLayerNorm(dims[0], True))]
            + [
                nn.Sequential(_OfficialLayerNorm(dims[i], True), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
                for i in range(3)
            ]
        )
        self.stages = nn.ModuleList(
            [nn.Sequential(*[_OfficialBlock(dims[i]) for _ in range(depths[i])]) for i in range(4)]
        )
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean([-2, -1])))


def official_model(size: str, num_classes: int = 10, seed: int = 3) -> _OfficialConvNeXtV2:
    spec = SIZES[size]
    return randomize_(_OfficialConvNeXtV2(spec.depths, spec.dims, num_classes), seed=seed).eval()  # type: ignore[return-value]


def official_decoder(fcmae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder side of an FCMAE state dict (:class:`models.fcmae.FCMAE`) in the official release's layout: the
    same names, GRN parameters shaped (1, 1, 1, C)."""
    prefixes = ("proj.", "mask_token", "decoder.", "pred.")
    return {
        k: v.reshape(1, 1, 1, -1) if k.endswith(("grn.gamma", "grn.beta")) else v
        for k, v in fcmae_state.items()
        if k.startswith(prefixes)
    }


def to_sparse_fcmae_layout(
    official_dense: dict[str, torch.Tensor], decoder: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The official FCMAE checkpoint layout (MinkowskiEngine kernels under ``encoder.``), from dense weights, with
    ``decoder`` (official layout, :func:`official_decoder`) when given: the released files carry none.

    This inverts the official sparse->dense remap: kernel (k*k, C) / (k*k, in, out), ``ln``/``linear`` infixes,
    (1, C) biases of sparse convs, (1, C) GRN parameters; the stem stays dense.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in official_dense.items():
        if key.startswith(("norm.", "head.")):
            continue  # the pretraining encoder has no classifier
        parts = key.split(".")
        stem = key.startswith("downsample_layers.0.")
        if not stem and parts[-1] == "weight" and value.ndim == 4:
            ks = value.shape[-1]
            if value.shape[1] == 1 and "dwconv" in key:
                value = value.transpose(3, 2).reshape(value.shape[0], ks * ks).permute(1, 0)
            else:
                out_dim, in_dim = value.shape[:2]
                value = value.transpose(3, 2).reshape(out_dim, in_dim, ks * ks).permute(2, 1, 0)
            parts[-1] = "kernel"
        elif not stem and parts[-1] == "bias" and ("dwconv" in key or key.startswith("downsample_layers")):
            if key.startswith("downsample_layers") and parts[2] == "0":
                parts.insert(-1, "ln")
            else:
                value = value.reshape(1, -1)
        elif not stem and (".norm." in key or (key.startswith("downsample_layers") and parts[2] == "0")):
            parts.insert(-1, "ln")
        elif "pwconv" in key:
            parts.insert(-1, "linear")
        elif "grn" in key:
            value = value.reshape(1, -1)
        out["encoder." + ".".join(parts)] = value.contiguous()
    out.update(decoder or {})
    return out
