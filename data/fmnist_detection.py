"""A small real detection set: Fashion-MNIST items placed on larger canvases, written as COCO JSON + PNG images.

    python -m data.fmnist_detection --output runs/data/fmnist-det/coco/train --split train --images 2000 --seed 0
    python -m data.write_shards --source coco --input runs/data/fmnist-det/coco/train/annotations.json \\
        --output runs/data/fmnist-det/train

Each canvas (128x128 by default, black like the items' own background) holds 1-4 real Fashion-MNIST items, each
upscaled (bicubic) to a random square size in [24, 56] px and placed so that its box keeps a margin from the
others. Split ``train`` draws items from Fashion-MNIST's training images, ``val`` from its test images, so the
validation items are unseen. An item's mask is its silhouette (grayscale above a threshold, holes filled), its box
the mask's extent, its category the item's class (COCO ids 1..10 with the Fashion-MNIST names). Images and
annotations derive from (seed, split, image index) only: a set is reproducible image by image. The annotation file
is written last, so a crashed run leaves no ``annotations.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
from pycocotools import mask as mask_utils

from data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist_files, read_idx

SPLITS = {"train": "train", "val": "test"}
"""Detection split -> the Fashion-MNIST split its items come from."""
_SPLIT_TAG = {"train": 1, "val": 2}  # keeps the random streams of the two splits apart for the same seed
_PLACEMENT_TRIES = 50


@dataclass(frozen=True)
class CanvasConfig:
    """How items are drawn onto a canvas."""

    canvas: int = 128
    """Canvas side in pixels."""
    min_item: int = 24
    """Smallest item side in pixels (the 28-px item is resized to a square of this size or more)."""
    max_item: int = 56
    """Largest item side in pixels."""
    max_items: int = 4
    """Items per canvas are drawn uniformly from 1..max_items (fewer when no free place is found)."""
    margin: int = 2
    """Minimum gap in pixels between the boxes of two items (no overlap)."""
    threshold: int = 32
    """Grayscale value (0-255, after resizing) above which a pixel belongs to the item's silhouette."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_item <= self.max_item <= self.canvas:
            raise ValueError(
                f"need 1 <= min_item ({self.min_item}) <= max_item ({self.max_item}) <= canvas ({self.canvas})"
            )
        if self.max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {self.max_items}")


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of a boolean mask: every pixel not reachable from outside the image through background."""
    # copy(): fromarray may wrap the numpy buffer, and floodfill's edits would then not show in asarray.
    padded = PIL.Image.fromarray(np.pad(mask, 1).astype(np.uint8) * 255).copy()
    PIL.ImageDraw.floodfill(padded, (0, 0), 128)  # marks the background connected to the border
    return (np.asarray(padded) != 128)[1:-1, 1:-1]


def categories() -> list[dict[str, Any]]:
    """COCO categories: ids 1..10 in Fashion-MNIST class order."""
    return [{"id": i + 1, "name": name, "supercategory": "fashion"} for i, name in enumerate(FASHION_MNIST_CLASSES)]


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    """Do two ``(x0, y0, x1, y1)`` boxes (exclusive ends) come closer than ``margin``?"""
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def make_canvas(
    items: np.ndarray, labels: np.ndarray, rng: np.random.Generator, config: CanvasConfig
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One canvas (uint8 HxW) and its objects: ``source_index``, ``label``, boolean ``mask`` and ``box`` (x0, y0,
    x1, y1 exclusive)."""
    side = config.canvas
    canvas = np.zeros((side, side), dtype=np.uint8)
    objects: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(1, config.max_items + 1))):
        index = int(rng.integers(len(items)))
        size = int(rng.integers(config.min_item, config.max_item + 1))
        patch = np.asarray(PIL.Image.fromarray(items[index]).resize((size, size), PIL.Image.Resampling.BICUBIC))
        silhouette = fill_holes(patch > config.threshold)
        if not silhouette.any():
            continue
        rows, cols = np.nonzero(silhouette)
        local = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
        for _ in range(_PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, side - size + 1, size=2))
            box = (x + local[0], y + local[1], x + local[2], y + local[3])
            if not any(_boxes_overlap(box, o["box"], config.margin) for o in objects):
                break
        else:
            continue  # the canvas is too full for this item
        # Items keep their faint fringe (below the threshold) in the image, as a real photo would.
        np.maximum(canvas[y : y + size, x : x + size], patch, out=canvas[y : y + size, x : x + size])
        mask = np.zeros((side, side), dtype=bool)
        mask[y : y + size, x : x + size] = silhouette
        objects.append({"source_index": index, "label": int(labels[index]), "mask": mask, "box": box})
    return canvas, objects


def generate(
    output: str | Path,
    split: str,
    num_images: int,
    seed: int,
    config: CanvasConfig | None = None,
    fmnist_root: str | Path = FASHION_MNIST_DIR,
) -> Path:
    """Write ``num_images`` canvases to ``output/images/`` and ``output/annotations.json``; returns the JSON path."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if num_images < 1:
        raise ValueError(f"--images must be >= 1, got {num_images}")
    config = config or CanvasConfig()
    images_path, labels_path = fashion_mnist_files(fmnist_root, SPLITS[split])
    items, labels = read_idx(images_path), read_idx(labels_path)
    out = Path(output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_TAG[split], i])
        canvas, objects = make_canvas(items, labels, rng, config)
        image_id = i + 1
        file_name = f"{split}-{i:06d}.png"
        PIL.Image.fromarray(canvas).save(out / "images" / file_name)
        coco_images.append({"id": image_id, "file_name": file_name, "width": config.canvas, "height": config.canvas})
        for obj in objects:
            rle = mask_utils.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
            x0, y0, x1, y1 = obj["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["label"] + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(obj["mask"].sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                    "source_index": obj["source_index"],
                }
            )
    dataset = {
        "info": {
            "description": f"Fashion-MNIST items on {config.canvas}-px canvases ({split})",
            "fashion_mnist_split": SPLITS[split],
            "seed": seed,
            **asdict(config),
        },
        "images": coco_images,
        "annotations": annotations,
        "categories": categories(),
    }
    path = out / "annotations.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dataset))
    os.replace(tmp, path)
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    defaults = CanvasConfig()
    p = argparse.ArgumentParser(prog="python -m data.fmnist_detection", description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="directory for annotations.json and images/")
    p.add_argument("--split", required=True, choices=tuple(SPLITS), help="train (Fashion-MNIST train items) or val")
    p.add_argument("--images", type=int, required=True, help="number of canvases")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--input", default=str(FASHION_MNIST_DIR), help="Fashion-MNIST idx directory")
    p.add_argument("--canvas", type=int, default=defaults.canvas, help=f"canvas side (default {defaults.canvas})")
    p.add_argument("--min-item", type=int, default=defaults.min_item, help="smallest item side in px")
    p.add_argument("--max-item", type=int, default=defaults.max_item, help="largest item side in px")
    p.add_argument("--max-items", type=int, default=defaults.max_items, help="most items per canvas")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the set; return the process exit code."""
    args = parse_args(argv)
    try:
        config = CanvasConfig(
            canvas=args.canvas, min_item=args.min_item, max_item=args.max_item, max_items=args.max_items
        )
        path = generate(args.output, args.split, args.images, args.seed, config, args.input)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dataset = json.loads(path.read_text())
    print(f"{len(dataset['images'])} images with {len(dataset['annotations'])} objects: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
