"""Checkpoint layouts: the official release (dense and FCMAE/sparse) and timm, converted to ours."""

from __future__ import annotations

import pytest
import timm
import torch

from models.checkpoints import from_official, from_timm, infer_size, load_foreign, to_official, to_timm
from models.convnextv2 import build
from models.fcmae import FCMAE
from tests.support.official import official_decoder, official_model, to_sparse_fcmae_layout
from tests.support.tensors import randomize_, rel_err


def test_official_dense_checkpoint_gives_identical_logits() -> None:
    reference = official_model("atto")
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
    reference = official_model("atto")
    decoder = official_decoder(FCMAE("atto").state_dict())  # dropped: the classifier does not use it
    sparse = to_sparse_fcmae_layout(reference.state_dict(), decoder)
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
    tiny_weights = from_official(official_model("femto").state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        build("atto", num_classes=10).load_state_dict(tiny_weights, strict=True)


def test_garbage_keys_name_the_key() -> None:
    with pytest.raises(KeyError, match=r"blocks\.weird"):
        from_timm({"blocks.weird.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="cannot tell the layout"):
        load_foreign({"foo.weight": torch.zeros(1)})
