"""Sample sources the shard writer converts: an image folder, a list file, Fashion-MNIST idx files, COCO JSON.

A source is indexable (``len`` + ``load(i)``) so the writer can shuffle, limit and show progress without loading
everything first. Every source returns RGB PIL images already resized to the requested size; the COCO source
rescales boxes and masks with the image.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import PIL.Image
import PIL.ImageOps

from data.pixels import pil_rgb8

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"})
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NO_LABEL = -1
"""``.cls`` value of a detection image without annotations (also the loader's ignore label)."""


# PIL format name -> the member extension of a file kept as it is; these are what the loader decodes.
PASS_THROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
LOSSLESS_FORMATS = ("PNG", "BMP", "TIFF", "PPM", "GIF")


@dataclass
class SourceSample:
    """One sample ready to encode: a unique key, an RGB image (or the original file's bytes), an integer label and
    optional JSON metadata."""

    key: str
    """Unique key without dots (webdataset splits member names at the first dot)."""
    image: PIL.Image.Image | None
    """RGB image at its final size; None when ``encoded`` holds the original file, which needs no change."""
    label: int
    """Class index written to ``{key}.cls``."""
    meta: dict[str, Any] | None = None
    """Written to ``{key}.json`` when not None (detection targets, original path, ...)."""
    encoded: tuple[str, bytes] | None = None
    """``(extension, bytes)`` of the original file when it can go into the shard as it is (no resize asked, a
    format the loader reads, no EXIF rotation): no generation loss, no encoding time."""
    lossless: bool = True
    """Whether the source image was lossless (PNG, arrays), which decides the format when it must be re-encoded."""

    def rgb(self) -> PIL.Image.Image:
        """The RGB image, decoded from ``encoded`` when only the bytes were kept."""
        if self.image is not None:
            return self.image
        assert self.encoded is not None
        with PIL.Image.open(io.BytesIO(self.encoded[1])) as img:
            return pil_rgb8(img)


class Source(Protocol):
    """What the writer needs from a source."""

    kind: str

    def __len__(self) -> int:
        """Number of samples."""
        ...

    def load(self, index: int) -> SourceSample:
        """Load and resize sample ``index``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Description stored in the manifest (classes, split, ...); no secrets."""
        ...


def sanitize_key(text: str, max_len: int = 80) -> str:
    """Make ``text`` usable as a webdataset key: no dots or odd characters, bounded length."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:max_len] or "x"


def resize_shorter(image: PIL.Image.Image, size: int | None) -> PIL.Image.Image:
    """Resize so the shorter side is ``size`` (bicubic, aspect kept); ``None`` keeps the image as is."""
    if size is None:
        return image
    w, h = image.size
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if new == (w, h) else image.resize(new, PIL.Image.Resampling.BICUBIC)


def original_file(path: Path) -> tuple[tuple[str, bytes] | None, bool]:
    """The file's ``(extension, bytes)`` if it can be stored as it is (real format read from its header, not from
    the file name), else None; and whether its format is lossless."""
    data = path.read_bytes()
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:  # reads the header only
            fmt, orientation = str(img.format), img.getexif().get(0x0112, 1)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); fix or remove the file") from exc
    lossless = fmt in LOSSLESS_FORMATS
    if fmt not in PASS_THROUGH_FORMATS or orientation != 1:  # a rotated photo is stored as viewers show it
        return None, lossless
    return (PASS_THROUGH_FORMATS[fmt], data), lossless


def is_lossless(path: Path) -> bool:
    """Whether the image file's format (from its header) is lossless: a re-encode then uses PNG, else JPEG."""
    try:
        with PIL.Image.open(path) as img:
            return str(img.format) in LOSSLESS_FORMATS
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); fix or remove the file") from exc


def _open_rgb(path: Path) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as img:
            # EXIF orientation is what a viewer shows; training should see the same.
            return pil_rgb8(PIL.ImageOps.exif_transpose(img))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); fix or remove the file") from exc


class _ImageFileSource:
    """Images on disk with integer labels: subclasses fill ``items`` and ``image_size``."""

    items: list[tuple[Path, int]]
    image_size: int | None

    def __len__(self) -> int:
        """Number of images."""
        return len(self.items)

    def load(self, index: int) -> SourceSample:
        """Image ``index``: its file as it is when no resize is asked and the loader reads the format, else RGB
        resized so its shorter side is ``image_size``."""
        path, label = self.items[index]
        key = f"{index:08d}-{sanitize_key(path.stem)}"
        if self.image_size is None:
            encoded, lossless = original_file(path)
            if encoded is not None:
                return SourceSample(key=key, image=None, label=label, encoded=encoded, lossless=lossless)
        else:
            lossless = is_lossless(path)
        image = resize_shorter(_open_rgb(path), self.image_size)
        return SourceSample(key=key, image=image, label=label, lossless=lossless)


class ImageFolderSource(_ImageFileSource):
    """ImageNet layout: ``root/<class>/<image>``; the label is the index of the class folder in sorted order."""

    kind = "imagefolder"

    def __init__(self, root: str | Path, image_size: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"--input {self.root}: not a directory (expected root/<class>/<image>)")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"--input {self.root}: no class folders found (expected root/<class>/<image>)")
        self.items: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.items.extend((p, label) for p in files)
        if not self.items:
            raise ValueError(f"--input {self.root}: class folders hold no images ({sorted(IMAGE_EXTENSIONS)})")
        self.image_size = image_size

    def describe(self) -> dict[str, Any]:
        """Classes in label order."""
        return {"classes": self.classes, "num_classes": len(self.classes)}


class ListSource(_ImageFileSource):
    """A text file of ``<image path> <integer label>`` lines (paths relative to the file; ``#`` comments)."""

    kind = "list"

    def __init__(self, list_file: str | Path, image_size: int | None = None) -> None:
        self.list_file = Path(list_file)
        base = self.list_file.parent
        self.items: list[tuple[Path, int]] = []
        for lineno, line in enumerate(self.list_file.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                path, label = line.rsplit(None, 1)
                self.items.append((base / path, int(label)))
            except ValueError as exc:
                raise ValueError(f"{self.list_file}:{lineno}: expected '<path> <integer label>', got {line!r}") from exc
        if not self.items:
            raise ValueError(f"{self.list_file}: no samples listed")
        self.image_size = image_size

    def describe(self) -> dict[str, Any]:
        """Number of classes (max label + 1)."""
        return {"num_classes": max(label for _, label in self.items) + 1}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format; plain or gzip) into a numpy array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: idx header says {shape} but holds {data.size} values (truncated file?)")
    return data.reshape(shape)


def fashion_mnist_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """Paths of the (images, labels) idx files of ``split`` ("train" or "test") under ``root``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"--split {split!r}: Fashion-MNIST has 'train' and 'test'")
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [Path(root) / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
        path = next((c for c in candidates if c.exists()), None)
        if path is None:
            raise FileNotFoundError(
                f"{candidates[0]} not found: install Debian's dataset-fashion-mnist package "
                "(apt-get install dataset-fashion-mnist) or pass --input <dir with the idx files>"
            )
        found.append(path)
    return found[0], found[1]


class FashionMNISTSource:
    """Fashion-MNIST from idx files: 28x28 grayscale, upscaled (bicubic) to ``image_size`` and made 3-channel.

    ``classes`` keeps the images of those classes only (a set of another domain: the bench's continuation source
    and target); ``per_class`` keeps the first N of each class in an order drawn from ``seed`` (a few-label set).
    """

    kind = "fashion-mnist"

    def __init__(
        self,
        root: str | Path = FASHION_MNIST_DIR,
        split: str = "train",
        image_size: int = 64,
        classes: Sequence[int] | None = None,
        per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.split = split
        images_path, labels_path = fashion_mnist_files(self.root, split)
        self.images = read_idx(images_path)
        self.labels = read_idx(labels_path)
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise ValueError(f"{images_path}, {labels_path}: image/label counts or shapes do not match")
        self.image_size = image_size
        self.classes = sorted(classes) if classes is not None else list(range(len(FASHION_MNIST_CLASSES)))
        bad = [c for c in self.classes if not 0 <= c < len(FASHION_MNIST_CLASSES)]
        if bad:
            raise ValueError(f"Fashion-MNIST has classes 0-{len(FASHION_MNIST_CLASSES) - 1}, not {bad}")
        if per_class is not None and per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        self.per_class, self.seed = per_class, seed
        order = np.arange(len(self.labels))
        if per_class is not None:  # the first N of each class in a seeded order, then back in idx order
            order = np.random.default_rng(seed).permutation(len(self.labels))
            order = np.sort(np.concatenate([order[self.labels[order] == c][:per_class] for c in self.classes]))
        self.indices = order[np.isin(self.labels[order], self.classes)]

    def __len__(self) -> int:
        """Number of images kept."""
        return len(self.indices)

    def load(self, index: int) -> SourceSample:
        """Kept image ``index`` upscaled to a square RGB image; the key keeps the idx index."""
        index = int(self.indices[index])
        image = PIL.Image.fromarray(self.images[index])  # uint8 HxW -> mode "L"
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC)
        return SourceSample(
            key=f"fmnist-{self.split}-{index:05d}", image=image.convert("RGB"), label=int(self.labels[index])
        )

    def describe(self) -> dict[str, Any]:
        """Split, classes and the original resolution."""
        subset: dict[str, Any] = {}
        if len(self.classes) < len(FASHION_MNIST_CLASSES):
            subset["kept_classes"] = self.classes
        if self.per_class is not None:
            subset.update(per_class=self.per_class, per_class_seed=self.seed)
        return {
            "split": self.split,
            "classes": list(FASHION_MNIST_CLASSES),
            "num_classes": len(FASHION_MNIST_CLASSES),
            "original_size": list(self.images.shape[1:]),
            **subset,
        }


@dataclass
class _CocoImage:
    info: dict[str, Any]
    annotations: list[dict[str, Any]] = field(default_factory=list)


class CocoSource:
    """A COCO-style detection set: ``instances.json`` plus an image folder.

    Each sample's ``.json`` holds boxes (COCO ``xywh`` in pixels of the stored image), contiguous labels, the
    original category ids, ``iscrowd``, areas and segmentations (polygons or RLE with string counts), all rescaled
    with the image. ``.cls`` is the label of the largest object (``-1`` for an image without annotations).
    """

    kind = "coco"

    def __init__(
        self, annotation_file: str | Path, image_root: str | Path | None = None, image_size: int | None = None
    ) -> None:
        self.annotation_file = Path(annotation_file)
        raw = json.loads(self.annotation_file.read_text())
        for key in ("images", "annotations", "categories"):
            if key not in raw:
                raise ValueError(f"{self.annotation_file}: not a COCO annotation file (no '{key}')")
        self.image_root = Path(image_root) if image_root is not None else self._default_root()
        self.categories = sorted(raw["categories"], key=lambda c: int(c["id"]))
        self.label_of = {int(c["id"]): i for i, c in enumerate(self.categories)}
        by_id = {int(im["id"]): _CocoImage(im) for im in raw["images"]}
        for ann in raw["annotations"]:
            image_id = int(ann["image_id"])
            if image_id not in by_id:
                raise ValueError(f"{self.annotation_file}: annotation {ann.get('id')} names unknown image {image_id}")
            by_id[image_id].annotations.append(ann)
        self.images = [by_id[k] for k in sorted(by_id)]
        self.image_size = image_size

    def _default_root(self) -> Path:
        # COCO puts annotations/ beside the image folder; a flat layout keeps images next to the JSON.
        here = self.annotation_file.parent
        for candidate in (here / "images", here.parent / "images", here):
            if candidate.is_dir():
                return candidate
        return here

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    def load(self, index: int) -> SourceSample:
        """Image ``index`` with its annotations rescaled to the stored size."""
        entry = self.images[index]
        path = self.image_root / entry.info["file_name"]
        original = _open_rgb(path)
        image = resize_shorter(original, self.image_size)
        sx, sy = image.size[0] / original.size[0], image.size[1] / original.size[1]
        anns = entry.annotations
        height, width = original.size[1], original.size[0]
        meta: dict[str, Any] = {
            "image_id": int(entry.info["id"]),
            "file_name": entry.info["file_name"],
            "width": image.size[0],
            "height": image.size[1],
            "orig_width": width,
            "orig_height": height,
            "box_format": "xywh",
            "boxes": [[a["bbox"][0] * sx, a["bbox"][1] * sy, a["bbox"][2] * sx, a["bbox"][3] * sy] for a in anns],
            "labels": [self.label_of[int(a["category_id"])] for a in anns],
            "category_ids": [int(a["category_id"]) for a in anns],
            "iscrowd": [int(a.get("iscrowd", 0)) for a in anns],
            "area": [float(a.get("area", a["bbox"][2] * a["bbox"][3])) * sx * sy for a in anns],
            "segmentation": [
                _scale_segmentation(a.get("segmentation"), (height, width), image.size, sx, sy) for a in anns
            ],
        }
        label = NO_LABEL
        if anns:
            # The largest non-crowd object names the image for classification-style consumers.
            ranked = sorted(range(len(anns)), key=lambda i: (meta["iscrowd"][i] == 0, meta["area"][i]))
            label = meta["labels"][ranked[-1]]
        key = f"{index:08d}-{sanitize_key(Path(entry.info['file_name']).stem)}"
        if self.image_size is None:  # the annotations need no rescaling: keep the file as it is if the loader reads it
            encoded, lossless = original_file(path)
            if encoded is not None:
                return SourceSample(key=key, image=None, label=label, meta=meta, encoded=encoded, lossless=lossless)
            return SourceSample(key=key, image=image, label=label, meta=meta, lossless=lossless)
        return SourceSample(key=key, image=image, label=label, meta=meta, lossless=is_lossless(path))

    def describe(self) -> dict[str, Any]:
        """Categories with their contiguous labels."""
        return {
            "categories": [
                {"id": int(c["id"]), "name": c.get("name", str(c["id"])), "label": i}
                for i, c in enumerate(self.categories)
            ],
            "num_classes": len(self.categories),
            "annotation_file": self.annotation_file.name,
        }


def _scale_segmentation(
    seg: Any, orig_hw: tuple[int, int], new_wh: tuple[int, int], sx: float, sy: float
) -> list[list[float]] | dict[str, Any] | None:
    """Rescale a polygon list or an RLE mask to the stored image size; RLE counts come back as a string."""
    if seg is None:
        return None
    if isinstance(seg, list):
        return [[float(v) * (sx if i % 2 == 0 else sy) for i, v in enumerate(poly)] for poly in seg]
    from pycocotools import mask as mask_utils

    h, w = orig_hw
    if isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)  # uncompressed (crowd) RLE -> compressed
    else:
        rle = {"size": list(seg["size"]), "counts": seg["counts"]}
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    if (sx, sy) != (1.0, 1.0):
        mask = mask_utils.decode(rle)
        resized = PIL.Image.fromarray(mask * 255).resize(new_wh, PIL.Image.Resampling.NEAREST)
        rle = mask_utils.encode(np.asfortranarray((np.asarray(resized) > 127).astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def build_source(
    kind: str,
    input_path: str | None,
    *,
    image_size: int | None,
    split: str = "train",
    image_root: str | None = None,
    classes: Sequence[int] | None = None,
    per_class: int | None = None,
    seed: int = 0,
) -> Source:
    """Construct the source named ``kind`` (imagefolder, list, fashion-mnist, coco); ``classes``, ``per_class`` and
    ``seed`` select a subset of Fashion-MNIST (:class:`FashionMNISTSource`)."""
    if kind == "fashion-mnist":
        root = input_path or FASHION_MNIST_DIR
        return FashionMNISTSource(root, split, image_size or 64, classes=classes, per_class=per_class, seed=seed)
    if classes is not None or per_class is not None:
        raise ValueError("--classes and --per-class select from Fashion-MNIST's labels: use them with that source")
    if input_path is None:
        raise ValueError(f"--source {kind} needs --input")
    if kind == "imagefolder":
        return ImageFolderSource(input_path, image_size)
    if kind == "list":
        return ListSource(input_path, image_size)
    if kind == "coco":
        return CocoSource(input_path, image_root, image_size)
    raise ValueError(f"--source {kind!r}: choose one of {', '.join(SOURCE_KINDS)}")


SOURCE_KINDS: Sequence[str] = ("imagefolder", "fashion-mnist", "coco", "list")
