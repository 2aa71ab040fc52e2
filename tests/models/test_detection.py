"""Mask R-CNN on ConvNeXt V2: pyramid levels, exact loading of pretrained trunks, refusals, train/eval outputs."""

from __future__ import annotations

import pytest
import torch

from models.checkpoints import to_official, to_timm
from models.convnextv2 import SIZES, build
from models.detection import TRUNK_PREFIX, ConvNeXtV2Features, ConvNeXtV2FPN, build_mask_rcnn
from models.fcmae import FCMAE
from tests.support.tensors import randomize_

TINY_DETECTOR = {"anchor_sizes": (8, 16, 32, 64, 128), "fpn_channels": 16, "min_size": 64, "max_size": 64}


def test_backbone_returns_four_levels_with_strides_4_to_32_and_stage_channels() -> None:
    features = ConvNeXtV2Features("atto")(torch.randn(2, 3, 64, 96))
    assert list(features) == ["0", "1", "2", "3"]
    for (name, fmap), stride, dim in zip(features.items(), (4, 8, 16, 32), SIZES["atto"].dims, strict=True):
        assert fmap.shape == (2, dim, 64 // stride, 96 // stride), name


def test_fpn_adds_p6_and_gives_every_level_the_pyramid_width() -> None:
    pyramid = ConvNeXtV2FPN("atto", fpn_channels=32)(torch.randn(1, 3, 128, 128))
    assert {name: tuple(p.shape[1:]) for name, p in pyramid.items()} == {
        "0": (32, 32, 32),
        "1": (32, 16, 16),
        "2": (32, 8, 8),
        "3": (32, 4, 4),
        "pool": (32, 2, 2),
    }


@pytest.fixture(scope="module")
def export() -> dict[str, torch.Tensor]:
    """What the pretraining stage exports: FCMAE.encoder_state_dict(), our layout with an untrained ``norm.*``."""
    return randomize_(FCMAE("atto", decoder_dim=32)).encoder_state_dict()


@pytest.mark.parametrize("layout", ["pretrain_export", "finetune_export", "timm", "official"])
def test_detector_loads_pretrained_trunk_weights_exactly(layout: str, export: dict[str, torch.Tensor]) -> None:
    classifier = build("atto", num_classes=5)
    classifier.load_state_dict({**export, "head.weight": torch.ones(5, 320), "head.bias": torch.zeros(5)})
    state = {
        "pretrain_export": export,
        "finetune_export": classifier.state_dict(),
        "timm": to_timm(export),
        "official": to_official(export),
    }[layout]
    detector = build_mask_rcnn("atto", 3, state, **TINY_DETECTOR)
    loaded = {k[len(TRUNK_PREFIX) :]: v for k, v in detector.state_dict().items() if k.startswith(TRUNK_PREFIX)}
    expected = {k: v for k, v in export.items() if not k.startswith("norm.")}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_wrong_size_is_refused_with_the_setting_to_change() -> None:
    femto = build("femto", num_classes=0).state_dict()
    with pytest.raises(ValueError, match=r"ConvNeXt V2-femto.*model\.size=femto"):
        build_mask_rcnn("atto", 3, femto, **TINY_DETECTOR)


def test_weights_that_are_no_convnext_are_refused() -> None:
    with pytest.raises(ValueError, match="layout"):
        build_mask_rcnn("atto", 3, {"conv1.weight": torch.zeros(1)}, **TINY_DETECTOR)


def test_anchor_sizes_need_one_size_per_level() -> None:
    with pytest.raises(ValueError, match="one size per pyramid level"):
        build_mask_rcnn("atto", 3, anchor_sizes=(32, 64, 128, 256))


def test_detector_trains_on_targets_and_predicts_boxes_and_masks() -> None:
    torch.manual_seed(0)
    detector = build_mask_rcnn("atto", 3, rois_per_image=32, detections_per_image=10, **TINY_DETECTOR)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:30, 5:25] = 1
    masks[1, 40:60, 30:62] = 1
    targets = [
        {"boxes": torch.tensor([[5.0, 10, 25, 30], [30, 40, 62, 60]]), "labels": torch.tensor([1, 3]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": masks[:0]},
    ]
    losses = detector(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = torch.stack(list(losses.values())).sum()
    assert torch.isfinite(total)
    total.backward()
    trunk = dict(detector.backbone.body.named_parameters())
    assert trunk and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk.values())  # it trains end to end
    # A few steps on the same two images fit them: the detection losses halve.
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3)
    first = float(total)
    for _ in range(15):
        optimizer.zero_grad()
        loss = torch.stack(list(detector(images, targets).values())).sum()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.5 * first, (first, float(loss))
    detector.eval()
    with torch.no_grad():
        outputs = detector(images)
    assert len(outputs) == 2
    for out in outputs:
        n = len(out["boxes"])
        assert n <= 10
        assert out["masks"].shape == (n, 1, 64, 64)
        assert out["labels"].shape == out["scores"].shape == (n,)


def test_bf16_detector_keeps_box_coordinates_in_float32() -> None:
    # bf16 has 8 bits of mantissa: near 1024 px it can only say 1000, 1008, 1016; anchors and boxes must not be bf16.
    detector = build_mask_rcnn("atto", 3, **TINY_DETECTOR).to(torch.bfloat16).eval()
    image = torch.rand(3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        inputs, _ = detector.transform([image])
        features = list(detector.backbone(inputs.tensors).values())
        anchors = detector.rpn.anchor_generator(inputs, features)
        outputs = detector([image])
    assert features[0].dtype == torch.bfloat16
    assert anchors[0].dtype == torch.float32 and outputs[0]["boxes"].dtype == torch.float32
    box = torch.tensor([[1001.0, 1002.0, 1033.0, 1034.0]])
    decoded = detector.roi_heads.box_coder.decode(torch.zeros(1, 4, dtype=torch.bfloat16), [box])
    assert torch.equal(decoded.reshape(1, 4), box)
