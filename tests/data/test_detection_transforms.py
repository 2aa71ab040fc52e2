"""Detection samples through the shard loader: COCO shards -> (images, targets) with large-scale jitter, and the
evaluation fit-and-pad that keeps the ground truth in stored-image pixels."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from data.detection_transforms import EvalImage, LargeScaleJitter, ResizePad, annotation_mask
from data.fmnist_detection import CanvasConfig, generate
from data.loader import LoaderConfig, build_loader
from data.sources import FASHION_MNIST_DIR, CocoSource, SourceSample
from data.writer import WriterConfig, write_shards

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).exists(),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def coco_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """20 Fashion-MNIST canvases of 96 px as COCO JSON and as shards of 8."""
    root = tmp_path_factory.mktemp("coco")
    annotations = generate(root / "coco", "train", 20, seed=1, config=CanvasConfig(canvas=96, max_item=48))
    write_shards(
        CocoSource(annotations), WriterConfig(output=str(root / "shards"), samples_per_shard=8, progress=False)
    )
    return annotations, str(root / "shards")


def test_jittered_targets_follow_the_image(coco_shards: tuple[Path, str]) -> None:
    _, shards = coco_shards
    loader = build_loader(shards, LoaderConfig(batch_size=4, seed=0), sample_transform=LargeScaleJitter(64, 0.5, 1.5))
    sizes = set()
    for images, targets in ((b.images, b.labels) for b in loader):
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.float32
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        for target in targets:
            boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
            assert masks.shape == (len(boxes), 64, 64) and masks.dtype == torch.uint8
            assert ((labels >= 1) & (labels <= 10)).all()
            assert (boxes[:, 2:] - boxes[:, :2] >= 1).all() and boxes.min() >= 0 and boxes.max() <= 64
            for box, mask in zip(boxes, masks, strict=True):
                rows, cols = torch.nonzero(mask, as_tuple=True)
                if len(rows):  # the mask stays inside its (clipped) box, up to resampling
                    assert cols.min() >= box[0] - 1 and cols.max() + 1 <= box[2] + 1
                    assert rows.min() >= box[1] - 1 and rows.max() + 1 <= box[3] + 1
                sizes.add(round(float(box[2] - box[0])))
    assert len(sizes) > 5  # the jitter really rescales


def test_jitter_draws_repeat_for_the_same_seed_and_epoch(coco_shards: tuple[Path, str]) -> None:
    _, shards = coco_shards

    def first_batch(seed: int) -> tuple[torch.Tensor, list]:
        loader = build_loader(
            shards, LoaderConfig(batch_size=4, seed=seed), sample_transform=LargeScaleJitter(64, 0.3, 2.0)
        )
        first = next(iter(loader))
        return first.images, first.labels

    (a, ta), (b, tb), (c, _) = first_batch(5), first_batch(5), first_batch(6)
    assert torch.equal(a, b) and all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(ta, tb, strict=True))
    assert not torch.equal(a, c)


def test_eval_slots_carry_the_coco_ground_truth_and_padding_is_none(coco_shards: tuple[Path, str]) -> None:
    annotations, shards = coco_shards
    dataset = json.loads(annotations.read_text())
    by_image: dict[int, list[dict]] = {}
    for ann in dataset["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    loader = build_loader(
        shards, LoaderConfig(batch_size=6, shuffle=False, remainder="pad"), sample_transform=ResizePad(128)
    )
    seen: list[EvalImage] = []
    padded = 0
    for images, infos in ((b.images, b.labels) for b in loader):
        assert images.shape == (6, 3, 128, 128)
        for image, info in zip(images, infos, strict=True):
            if info is None:
                padded += 1
                continue
            seen.append(info)
            assert info.scale == 128 / 96 and info.resized == (128, 128)
            assert [a["bbox"] for a in info.annotations] == [a["bbox"] for a in by_image[info.image_id]]
            assert [a["category_id"] for a in info.annotations] == [a["category_id"] for a in by_image[info.image_id]]
            assert float(image.std()) > 0
    assert sorted(i.image_id for i in seen) == list(range(1, 21)) and padded == 4


class _WithoutTargets:
    """A COCO source whose sample ``drop`` lost its ``.json`` (as a damaged or hand-made shard would)."""

    kind = "coco"

    def __init__(self, inner: CocoSource, drop: int) -> None:
        self.inner, self.drop = inner, drop

    def __len__(self) -> int:
        return len(self.inner)

    def load(self, index: int) -> SourceSample:
        sample = self.inner.load(index)
        return replace(sample, meta=None) if index == self.drop else sample

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


def test_a_sample_without_targets_is_skipped_counted_and_replaced(
    coco_shards: tuple[Path, str], tmp_path: Path
) -> None:
    annotations, _ = coco_shards
    source = _WithoutTargets(CocoSource(annotations), drop=3)
    write_shards(source, WriterConfig(output=str(tmp_path), samples_per_shard=8, shuffle_seed=None, progress=False))
    loader = build_loader(
        str(tmp_path), LoaderConfig(batch_size=4, shuffle=False), sample_transform=LargeScaleJitter(64, 1, 1)
    )
    batches = list(loader)
    assert len(batches) == 5 and all(len(b.labels) == 4 and None not in b.labels for b in batches)
    assert loader.stats.bad_label == 1 and loader.stats.replaced == 1


def test_resize_pad_keeps_the_image_top_left_and_pads_with_the_mean() -> None:
    import PIL.Image

    image = PIL.Image.fromarray(np.full((50, 100, 3), 255, dtype=np.uint8))
    meta = {"image_id": 7, "boxes": [], "category_ids": [], "area": [], "iscrowd": [], "segmentation": []}
    tensor, info = ResizePad(64)(image, meta)
    assert tensor.shape == (3, 64, 64) and info.resized == (32, 64) and info.scale == 0.64
    assert torch.allclose(tensor[:, :32], torch.ones(3, 32, 64))
    assert torch.allclose(tensor[:, 33:, 0], torch.tensor([124 / 255, 116 / 255, 104 / 255])[:, None])


def test_annotation_mask_reads_polygons_and_rle() -> None:
    square = np.zeros((20, 30), dtype=np.uint8)
    square[5:10, 10:20] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    rle_str = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    assert np.array_equal(annotation_mask(rle_str, 20, 30), square)
    polygon = annotation_mask([[10, 5, 20, 5, 20, 10, 10, 10]], 20, 30)
    assert polygon[5:10, 10:20].all() and polygon.sum() <= 5 * 10 + 30
