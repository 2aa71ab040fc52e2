"""Shard sets the tests train on: real Fashion-MNIST images, tiny image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

from data.fmnist_detection import CanvasConfig, generate
from data.manifest import Manifest
from data.sources import FASHION_MNIST_DIR, CocoSource, ImageFolderSource, build_source
from data.writer import WriterConfig, write_shards


def fmnist_shards_of(factory: pytest.TempPathFactory, split: str, limit: int, per_shard: int) -> str:
    """The first ``limit`` real Fashion-MNIST images of a split at 64 px, as shards of ``per_shard`` samples."""
    if not Path(FASHION_MNIST_DIR).exists():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist")
    out = factory.mktemp("fmnist") / split
    source = build_source("fashion-mnist", None, image_size=64, split=split)
    write_shards(source, WriterConfig(output=str(out), samples_per_shard=per_shard, limit=limit, progress=False))
    return str(out)


def make_image_folder(root: Path, classes: int, per_class: int, size: tuple[int, int] = (12, 10)) -> Path:
    """An ImageNet-layout folder of tiny PNGs; pixel values encode (class, index) so tests can check content."""
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng(c * 1000 + i)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            pixels[0, 0] = (c, i, 7)
            PIL.Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


def write_folder_shards(folder: Path, output: str, samples_per_shard: int, **kw: Any) -> Manifest:
    """Write ``folder`` as shards (8 px images) and return the manifest."""
    config = WriterConfig(output=output, samples_per_shard=samples_per_shard, progress=False, **kw)
    return write_shards(ImageFolderSource(folder, image_size=8), config)


def detection_shards(root: Path) -> tuple[str, str]:
    """32 training and 8 validation canvases of 64 px with 1-3 real Fashion-MNIST items each, as shards."""
    if not Path(FASHION_MNIST_DIR).exists():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist")
    canvas = CanvasConfig(canvas=64, min_item=16, max_item=32, max_items=3)
    urls = []
    for split, count in (("train", 32), ("val", 8)):
        annotations = generate(root / "coco" / split, split, count, seed=0, config=canvas)
        out = str(root / split)
        write_shards(CocoSource(annotations), WriterConfig(output=out, samples_per_shard=16, progress=False))
        urls.append(out)
    return urls[0], urls[1]
