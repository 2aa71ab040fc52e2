"""Detection transforms: the COCO targets a shard's ``.json`` holds -> Mask R-CNN targets, with large-scale jitter.

:class:`~data.sources.CocoSource` stores per image COCO ``xywh`` boxes, contiguous labels, category ids, crowd
flags, areas and segmentations (polygons or RLE) in pixels of the stored image. The loader
(:class:`data.loader.ShardLoader` with a ``sample_transform``) hands them to one of these transforms:

- :class:`LargeScaleJitter` (training): resize by a random factor of the fit-to-``size`` scale, random crop or pad
  to ``size x size``, horizontal flip; boxes, masks and labels follow (torchvision ``transforms.v2``), and objects
  cut away by the crop are dropped. Draws come from the global generators, which the loader seeds per sample slot.
- :class:`ResizePad` (evaluation): fit the longer side to ``size`` and pad bottom/right, keeping the ground truth
  in stored-image pixels and the scale that maps predictions back to them (:class:`EvalImage`).

Images leave as float tensors in [0, 1]: the detector normalizes them itself. Padding is the ImageNet mean, which
is zero after that normalization.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from pycocotools import mask as mask_utils
from timm.data.constants import IMAGENET_DEFAULT_MEAN
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

MEAN_FILL = tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN)
"""Padding colour (uint8 RGB): the ImageNet mean."""


def segmentation_or_box(segmentation: Any, box_xywh: list[float]) -> Any:
    """The annotation's segmentation, or its box as a polygon when it has none (Mask R-CNN needs a mask)."""
    if segmentation is None or segmentation == []:
        x, y, w, h = box_xywh
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return segmentation


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A ``(height, width)`` uint8 mask from a COCO segmentation (polygons or RLE with string or byte counts)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed RLE
    else:
        rle = dict(segmentation)
    return np.asarray(mask_utils.decode(rle), dtype=np.uint8)


def training_targets(meta: dict[str, Any], height: int, width: int) -> dict[str, torch.Tensor]:
    """torchvision targets of one image: boxes ``xyxy``, labels (contiguous + 1, 0 is background), masks.

    Crowd regions are left out: torchvision's Mask R-CNN cannot ignore them, and treating them as single objects
    would teach it to box crowds.
    """
    keep = [i for i, crowd in enumerate(meta.get("iscrowd", [0] * len(meta["boxes"]))) if not crowd]
    boxes = torch.tensor([meta["boxes"][i] for i in keep], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    masks = np.zeros((len(keep), height, width), dtype=np.uint8)
    for row, i in enumerate(keep):
        segmentation = segmentation_or_box(meta["segmentation"][i], meta["boxes"][i])
        masks[row] = annotation_mask(segmentation, height, width)
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor([meta["labels"][i] + 1 for i in keep], dtype=torch.int64),
        "masks": tv_tensors.Mask(torch.from_numpy(masks)),
    }


class LargeScaleJitter:
    """Training transform: large-scale jitter to ``size x size`` (Ghiasi et al. 2021) and a horizontal flip.

    The image is resized so that it fits ``size x size`` times a factor drawn from ``[min_scale, max_scale]``, then
    randomly cropped (when larger) or padded at a random offset (when smaller) to exactly ``size x size``. Objects
    whose box shrinks below one pixel are removed with their labels and masks.
    """

    def __init__(self, size: int, min_scale: float, max_scale: float) -> None:
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"large-scale jitter needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.size = size
        self.pipeline = v2.Compose(
            [
                v2.ScaleJitter((size, size), scale_range=(min_scale, max_scale), antialias=True),
                v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: MEAN_FILL, "others": 0}),
                v2.RandomHorizontalFlip(),
                v2.SanitizeBoundingBoxes(min_size=1.0),
                v2.ToDtype(torch.float32, scale=True),
                v2.ToPureTensor(),
            ]
        )

    def __call__(self, image: PIL.Image.Image, meta: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image tensor ``(3, size, size)`` in [0, 1] and its targets (boxes, labels, masks)."""
        pixels = tv_tensors.Image(TF.pil_to_tensor(image))
        targets = training_targets(meta, image.height, image.width)
        out_image, out_targets = self.pipeline(pixels, targets)
        return out_image, out_targets


@dataclass
class EvalImage:
    """Ground truth of one evaluation image (stored-image pixels) and how its input tensor was made from it."""

    image_id: int
    """COCO image id."""
    height: int
    """Stored image height."""
    width: int
    """Stored image width."""
    scale: float
    """Input pixels per stored pixel: divide predicted boxes by it."""
    resized: tuple[int, int]
    """(height, width) of the image inside the padded input; predicted masks are cropped to it."""
    annotations: list[dict[str, Any]] = field(default_factory=list)
    """COCO annotations (bbox xywh, category_id, area, iscrowd, segmentation), without ids."""


def ground_truth(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """COCO annotations of an image from its shard ``.json`` (boxes without a segmentation get a box polygon)."""
    annotations = []
    for i, box in enumerate(meta["boxes"]):
        annotations.append(
            {
                "bbox": [float(v) for v in box],
                "category_id": int(meta["category_ids"][i]),
                "area": float(meta["area"][i]),
                "iscrowd": int(meta["iscrowd"][i]),
                "segmentation": segmentation_or_box(meta["segmentation"][i], box),
            }
        )
    return annotations


class ResizePad:
    """Evaluation transform: fit the longer side to ``size`` (bilinear), pad bottom/right to ``size x size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: PIL.Image.Image, meta: dict[str, Any]) -> tuple[torch.Tensor, EvalImage]:
        """Input tensor ``(3, size, size)`` in [0, 1] and the image's :class:`EvalImage`."""
        width, height = image.size
        scale = self.size / max(height, width)
        resized = (min(self.size, round(height * scale)), min(self.size, round(width * scale)))
        pixels = TF.pil_to_tensor(image)
        if resized != (height, width):
            pixels = TF.resize(pixels, list(resized), antialias=True)
        padding = [0, 0, self.size - resized[1], self.size - resized[0]]  # left, top, right, bottom
        tensor = TF.to_dtype(TF.pad(tv_tensors.Image(pixels), padding, fill=list(MEAN_FILL)), torch.float32, scale=True)
        info = EvalImage(
            image_id=int(meta["image_id"]),
            height=height,
            width=width,
            scale=scale,
            resized=resized,
            annotations=ground_truth(meta),
        )
        return tensor.as_subclass(torch.Tensor), info
