"""Checkpoint layouts: the official release (dense and FCMAE/sparse) and timm, converted to ours."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoints import from_official, from_timm, infer_size, load_foreign, to_official, to_timm
from models.convnextv2 import SIZES, build
from tests.support.tensors import randomize_, rel_err


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


def _official(size: str, num_classes: int = 10, seed: int = 3) -> _OfficialConvNeXtV2:
    spec = SIZES[size]
    return randomize_(_OfficialConvNeXtV2(spec.depths, spec.dims, num_classes), seed=seed).eval()  # type: ignore[return-value]


def _to_sparse_fcmae_layout(official_dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official FCMAE checkpoint layout (MinkowskiEngine kernels under ``encoder.``), from dense weights.

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
    # Decoder weights of an FCMAE checkpoint are not part of the encoder and must be dropped.
    out["proj.weight"] = torch.zeros(512, 320, 1, 1)
    out["mask_token"] = torch.zeros(1, 512, 1, 1)
    out["decoder.0.dwconv.weight"] = torch.zeros(512, 1, 7, 7)
    out["pred.weight"] = torch.zeros(3072, 512, 1, 1)
    return out


def test_official_dense_checkpoint_gives_identical_logits() -> None:
    reference = _official("atto")
    model = build("atto", num_classes=10).eval()
    model.load_state_dict(from_official({"model": reference.state_dict()}), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model(x), reference(x)) < 1e-5
    # to_official goes back to the same keys and values.
    back = to_official(model.state_dict())
    assert back.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_official_fcmae_sparse_checkpoint_loads_the_encoder() -> None:
    reference = _official("atto")
    sparse = _to_sparse_fcmae_layout(reference.state_dict())
    assert any(k.endswith("dwconv.kernel") for k in sparse)
    converted = from_official({"model": sparse, "epoch": 799})
    model = build("atto", num_classes=0).eval()
    model.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(model.forward_features(x), reference.features(x)) < 1e-5
    torch.testing.assert_close(model.norm.weight, torch.ones(320))


@pytest.mark.parametrize("size", ["atto", "tiny"])  # timm's atto has 1x1-conv MLPs (4-D fc weights), tiny Linear
def test_timm_round_trip_is_exact(size: str) -> None:
    model = randomize_(build(size), seed=5).eval()
    ours = model.state_dict()
    timm_sd = to_timm(ours)
    back = from_timm(timm_sd)
    assert back.keys() == ours.keys()
    for key, value in ours.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # The timm-layout dict is what timm itself holds after a strict load, and gives our logits.
    reference = timm.create_model(f"convnextv2_{size}", pretrained=False).eval()
    reference.load_state_dict(timm_sd, strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, timm_sd[key]), key
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(reference(x), model(x)) < 1e-5
    assert infer_size(back) == size


def test_load_foreign_detects_each_layout() -> None:
    model = build("atto", num_classes=10)
    ours = model.state_dict()
    for foreign in (ours, to_timm(ours), to_official(ours)):
        converted = load_foreign(foreign)
        assert converted.keys() == ours.keys()
        for key in ours:
            torch.testing.assert_close(converted[key], ours[key], rtol=0, atol=0)


def test_a_checkpoint_of_another_size_is_refused() -> None:
    tiny_weights = from_official(_official("femto").state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        build("atto", num_classes=10).load_state_dict(tiny_weights, strict=True)


def test_garbage_keys_name_the_key() -> None:
    with pytest.raises(KeyError, match=r"blocks\.weird"):
        from_timm({"blocks.weird.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="cannot tell the layout"):
        load_foreign({"foo.weight": torch.zeros(1)})
