"""The Fashion-MNIST detection set: real items on canvases, boxes and masks from silhouettes, COCO-loadable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from pycocotools.coco import COCO

from data.fmnist_detection import CanvasConfig, generate, main
from data.sources import FASHION_MNIST_DIR, fashion_mnist_files, read_idx

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).exists(),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 canvases of the train split."""
    return generate(tmp_path_factory.mktemp("det") / "train", "train", 16, seed=3)


def _labels(split: str) -> np.ndarray:
    return read_idx(fashion_mnist_files(FASHION_MNIST_DIR, split)[1])


def test_coco_json_loads_in_pycocotools_with_ten_fashion_categories(train_set: Path) -> None:
    coco = COCO(str(train_set))
    assert len(coco.getImgIds()) == 16
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())][:2] == ["T-shirt/top", "Trouser"]
    assert coco.getCatIds() == list(range(1, 11))
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(per_image) >= 1 and max(per_image) <= 4
    for image in coco.loadImgs(coco.getImgIds()):
        assert PIL.Image.open(train_set.parent / "images" / image["file_name"]).size == (128, 128)


def test_boxes_are_the_extent_of_the_masks_and_masks_are_the_item_silhouettes(train_set: Path) -> None:
    coco = COCO(str(train_set))
    threshold = CanvasConfig().threshold
    for image in coco.loadImgs(coco.getImgIds()):
        pixels = np.asarray(PIL.Image.open(train_set.parent / "images" / image["file_name"]))
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            mask = coco.annToMask(ann).astype(bool)
            rows, cols = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x, y, x + w, y + h)
            assert ann["area"] == mask.sum()
            # Inside its box, every bright pixel belongs to the item (boxes of other items keep a margin) ...
            box = (slice(int(y), int(y + h)), slice(int(x), int(x + w)))
            assert not (pixels[box] > threshold)[~mask[box]].any()
            # ... and the mask is the bright silhouette, only its filled holes may be darker.
            assert (pixels[mask] > threshold).mean() > 0.8


def test_labels_are_the_classes_of_the_placed_items(train_set: Path) -> None:
    labels = _labels("train")
    annotations = json.loads(train_set.read_text())["annotations"]
    assert [a["category_id"] - 1 for a in annotations] == [int(labels[a["source_index"]]) for a in annotations]
    assert len({a["category_id"] for a in annotations}) > 3


def test_items_do_not_overlap(train_set: Path) -> None:
    coco = COCO(str(train_set))
    for image_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert np.sum(masks, axis=0).max() == 1


def test_same_seed_gives_the_same_set_and_another_seed_another(tmp_path: Path, train_set: Path) -> None:
    again = generate(tmp_path / "again", "train", 16, seed=3)
    assert again.read_text() == train_set.read_text()
    for name in ("train-000000.png", "train-000015.png"):
        assert (again.parent / "images" / name).read_bytes() == (train_set.parent / "images" / name).read_bytes()
    other = generate(tmp_path / "other", "train", 16, seed=4)
    assert json.loads(other.read_text())["annotations"] != json.loads(train_set.read_text())["annotations"]


def test_cli_val_split_places_unseen_test_items(tmp_path: Path) -> None:
    out = tmp_path / "val"
    assert main(["--output", str(out), "--split", "val", "--images", "5", "--seed", "0", "--canvas", "96"]) == 0
    dataset = json.loads((out / "annotations.json").read_text())
    labels = _labels("test")
    assert all(a["category_id"] - 1 == labels[a["source_index"]] for a in dataset["annotations"])
    assert {(i["width"], i["height"]) for i in dataset["images"]} == {(96, 96)}
    assert dataset["info"]["fashion_mnist_split"] == "test"


def test_cli_refuses_items_larger_than_the_canvas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--output", str(tmp_path), "--split", "train", "--images", "1", "--canvas", "32"]
    assert main(argv) == 2
    assert "max_item (56) <= canvas (32)" in capsys.readouterr().err
