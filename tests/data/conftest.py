"""Shared fixtures of the data tests: a real S3 endpoint (moto server), tiny image folders and shard sets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

from data.manifest import Manifest
from data.sources import ImageFolderSource
from data.writer import WriterConfig, write_shards


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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 20 images of 12x10 px."""
    return make_image_folder(tmp_path_factory.mktemp("folder"), classes=3, per_class=20)


def write_folder_shards(folder: Path, output: str, samples_per_shard: int, **kw: Any) -> Manifest:
    """Write ``folder`` as shards (8 px images) and return the manifest."""
    config = WriterConfig(output=output, samples_per_shard=samples_per_shard, progress=False, **kw)
    return write_shards(ImageFolderSource(folder, image_size=8), config)


@pytest.fixture(scope="session")
def shard_dir(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """60 samples in shards of 7 (the last one has 4): a read-only set shared by loader tests."""
    out = tmp_path_factory.mktemp("shards") / "set"
    write_folder_shards(image_folder, str(out), samples_per_shard=7)
    return str(out)
