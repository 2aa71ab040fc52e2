"""Mask R-CNN with FPN on a ConvNeXt V2 backbone: our trunk, torchvision's pyramid, RPN and RoI heads.

The backbone runs the ConvNeXt V2 trunk of :mod:`models.convnextv2` and returns its four stage maps (strides 4, 8,
16, 32), each through its own LayerNorm as in the official ConvNeXt detection backbone (the maps of a classifier
trunk are not normalized; these norms are new, not pretrained). torchvision's ``FeaturePyramidNetwork`` turns them
into P2-P5 plus P6 (a max pool of P5); the RPN has one anchor size per level and aspect ratios (0.5, 1, 2); box and
mask heads pool P2-P5 with ``MultiScaleRoIAlign``. With ``fpn_channels=256`` the heads are torchvision's Mask R-CNN
defaults; narrower pyramids (tiny demos) scale the heads with them. Anchors and box decoding stay in float32 in
bf16 runs (torchvision would compute them in the features' dtype, quantizing coordinates by up to 8 px at 1024).

Pretrained weights go into the trunk only: a pretraining export (``build(size, num_classes=0)`` layout, whose
``norm.*`` the detector does not use), a fine-tune export (its ``norm.*`` and ``head.*`` are dropped), or an
official / timm checkpoint, through :func:`models.checkpoints.load_foreign`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from models.checkpoints import infer_size, load_foreign
from models.convnextv2 import LN_EPS, ConvNeXtV2Encoder, LayerNorm2d, build_encoder, get_size

FEATURE_NAMES = ("0", "1", "2", "3")
"""Names of the stage maps (strides 4, 8, 16, 32) in the backbone's output and the RoI poolers."""
ASPECT_RATIOS = (0.5, 1.0, 2.0)
TRUNK_PREFIX = "backbone.body.trunk."
"""Where the ConvNeXt V2 trunk's parameters sit in the detector's state dict."""


class ConvNeXtV2Features(nn.Module):
    """The ConvNeXt V2 trunk returning its four stage maps, each LayerNorm-ed, by name (``"0"`` .. ``"3"``)."""

    def __init__(self, size: str, drop_path: float = 0.0) -> None:
        super().__init__()
        self.trunk: ConvNeXtV2Encoder = build_encoder(size, drop_path=drop_path)
        self.norms = nn.ModuleList(LayerNorm2d(dim, eps=LN_EPS) for dim in self.trunk.dims)

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the four maps (the trunk's feature levels)."""
        return tuple(channels for channels, _stride in self.trunk.feature_levels)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        x = self.trunk.stem(x)
        features: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, stage, norm in zip(FEATURE_NAMES, self.trunk.iter_stages(), self.norms, strict=True):
            x = stage(x)
            features[name] = norm(x)
        return features


class Float32AnchorGenerator(AnchorGenerator):
    """Anchors in float32 whatever the dtype of the features: in bf16, coordinates near 1024 px are 8 px apart."""

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        # torchvision reads only shape, dtype and device of the maps: zero-cost float32 stand-ins.
        stand_ins = [torch.zeros((), device=f.device).expand(f.shape) for f in feature_maps]
        return super().forward(image_list, stand_ins)


class Float32BoxCoder(BoxCoder):
    """Decodes box deltas in float32: torchvision decodes in the dtype of the deltas, which is bf16 in bf16 runs."""

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return super().decode_single(rel_codes.float(), boxes.float())


class ConvNeXtV2FPN(nn.Module):
    """Backbone + FPN: image -> P2..P6 (``"0"`` .. ``"3"``, ``"pool"``), each with ``out_channels`` channels."""

    def __init__(self, size: str, drop_path: float = 0.0, fpn_channels: int = 256) -> None:
        super().__init__()
        self.body = ConvNeXtV2Features(size, drop_path)
        self.fpn = FeaturePyramidNetwork(list(self.body.channels), fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels  # read by torchvision's detection heads

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def load_backbone(detector: MaskRCNN, state_dict: Mapping[str, object], size: str) -> None:
    """Load pretrained ConvNeXt V2 weights (any layout :func:`load_foreign` knows) into the detector's trunk,
    exactly. Raises ``ValueError`` when the weights are of another size than ``size`` or not a ConvNeXt V2."""
    backbone = detector.backbone
    if not isinstance(backbone, ConvNeXtV2FPN):
        raise TypeError(f"detector has a {type(backbone).__name__} backbone, not ConvNeXtV2FPN")
    try:
        converted = load_foreign(state_dict)
        found = infer_size(converted)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"the pretrained weights are not a ConvNeXt V2 backbone: {exc}") from exc
    if found != size:
        raise ValueError(
            f"the pretrained weights are ConvNeXt V2-{found} but the detector is built as {size!r}: set "
            f"model.size={found}, or point model.pretrained at a {size} checkpoint"
        )
    # The classifier's norm and head (and an FCMAE export's untrained norm) have no place in the detector.
    trunk_state = {k: v for k, v in converted.items() if k.startswith(("stem.", "stages."))}
    backbone.body.trunk.load_state_dict(trunk_state, strict=True)


def build_mask_rcnn(
    size: str,
    num_classes: int,
    pretrained_backbone_state: Mapping[str, object] | None = None,
    drop_path: float = 0.0,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    fpn_channels: int = 256,
    min_size: int = 1024,
    max_size: int = 1024,
    detections_per_image: int = 100,
    rois_per_image: int = 512,
) -> MaskRCNN:
    """Mask R-CNN + FPN on ConvNeXt V2-``size`` for ``num_classes`` object classes (background is added).

    ``anchor_sizes`` gives one size per level P2..P6. ``min_size``/``max_size`` are torchvision's input resize
    bounds; inputs already at ``min_size == max_size`` (our transforms) pass through unchanged. The model takes
    RGB images in [0, 1] and normalizes them with the ImageNet statistics. ``rois_per_image`` is the number of
    proposals sampled per training image for the box and mask heads (a quarter of them positive at most).
    """
    get_size(size)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (object classes, without background), got {num_classes}")
    levels = len(FEATURE_NAMES) + 1
    if len(anchor_sizes) != levels:
        raise ValueError(f"anchor_sizes needs one size per pyramid level P2..P6 ({levels}), got {list(anchor_sizes)}")
    backbone = ConvNeXtV2FPN(size, drop_path, fpn_channels)
    representation = 4 * fpn_channels  # torchvision's 1024 at the standard 256-channel pyramid
    detector = MaskRCNN(
        backbone,
        num_classes=None,  # given by the predictors below
        min_size=min_size,
        max_size=max_size,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        rpn_anchor_generator=Float32AnchorGenerator(
            tuple((int(s),) for s in anchor_sizes), (ASPECT_RATIOS,) * len(anchor_sizes)
        ),
        rpn_head=RPNHead(fpn_channels, len(ASPECT_RATIOS)),
        box_roi_pool=MultiScaleRoIAlign(list(FEATURE_NAMES), output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation),
        box_predictor=FastRCNNPredictor(representation, num_classes + 1),
        box_batch_size_per_image=rois_per_image,
        box_detections_per_img=detections_per_image,
        mask_roi_pool=MultiScaleRoIAlign(list(FEATURE_NAMES), output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1),
    )
    # Box coordinates stay float32 in bf16 runs (anchors above, decoded proposals and detections here).
    detector.rpn.box_coder = Float32BoxCoder(detector.rpn.box_coder.weights)
    detector.roi_heads.box_coder = Float32BoxCoder(detector.roi_heads.box_coder.weights)
    if pretrained_backbone_state is not None:
        load_backbone(detector, pretrained_backbone_state, size)
    return detector


def layer_ids(detector: MaskRCNN) -> tuple[dict[str, int], int]:
    """Layer ids of every detector parameter for layer-wise lr decay, and the trunk's number of layers: the
    official ConvNeXt detection groups on the trunk (grouping ``stage``: stem 0, stage 1 -> 1, stage 2 -> 2, stage 3
    in groups of three blocks, stage 4 last); the per-level norms, FPN and heads above them."""
    backbone = detector.backbone
    if not isinstance(backbone, ConvNeXtV2FPN):
        raise TypeError(f"detector has a {type(backbone).__name__} backbone, not ConvNeXtV2FPN")
    trunk = backbone.body.trunk
    top = trunk.num_layers("stage")
    trunk_ids = {TRUNK_PREFIX + name: i for name, i in trunk.layer_ids("stage").items()}
    return {name: trunk_ids.get(name, top + 1) for name, _ in detector.named_parameters()}, top
