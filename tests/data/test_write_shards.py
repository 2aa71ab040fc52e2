"""The shard writer and its CLI: real conversions read back with plain tarfile, independent of the loader."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from pycocotools import mask as mask_utils

from data.manifest import read_manifest
from data.sources import FASHION_MNIST_DIR, CocoSource, ImageFolderSource, fashion_mnist_files, read_idx
from data.write_shards import main
from data.writer import WriterConfig, write_shards


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a tar as key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member)
            assert data is not None
            samples.setdefault(key, {})[ext] = data.read()
    return samples


def read_set(directory: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a shard set, checking the manifest's counts, sizes and hashes on the way."""
    manifest = read_manifest(str(directory))
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest.shards:
        path = directory / shard.name
        assert path.stat().st_size == shard.num_bytes
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256
        got = read_tar(path)
        assert len(got) == shard.num_samples
        samples.update(got)
    assert len(samples) == manifest.num_samples
    return samples


def pixels(data: bytes) -> np.ndarray:
    """Decoded RGB pixels of an encoded image."""
    return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))


needs_fmnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.exists(), reason="apt-get install dataset-fashion-mnist (Debian package) for this test"
)


@needs_fmnist
def test_fashion_mnist_round_trip_matches_idx_labels_and_pixels(tmp_path: Path) -> None:
    out = tmp_path / "fm-test"
    args = ["--source", "fashion-mnist", "--split", "test", "--output", str(out), "--image-size", "28"]
    assert main([*args, "--limit", "30", "--samples-per-shard", "8", "--quiet"]) == 0
    images_path, labels_path = fashion_mnist_files(FASHION_MNIST_DIR, "test")
    images, labels = read_idx(images_path), read_idx(labels_path)
    manifest = read_manifest(str(out))
    assert [s.num_samples for s in manifest.shards] == [8, 8, 8, 6]
    assert manifest.num_classes == 10 and manifest.source["split"] == "test"
    samples = read_set(out)
    indices = sorted(int(key.rsplit("-", 1)[1]) for key in samples)
    assert len(set(indices)) == 30 and indices != list(range(30))  # a shuffled subset of the split
    for key, files in samples.items():
        index = int(key.rsplit("-", 1)[1])
        assert int(files["cls"]) == labels[index]
        rgb = pixels(files["png"])
        assert rgb.shape == (28, 28, 3)
        for channel in range(3):  # PNG is lossless: every channel is the original grayscale image
            np.testing.assert_array_equal(rgb[..., channel], images[index])


@needs_fmnist
def test_fashion_mnist_is_upscaled_to_the_requested_size(tmp_path: Path) -> None:
    out = tmp_path / "fm-train"
    assert (
        main(["--source", "fashion-mnist", "--output", str(out), "--image-size", "64", "--limit", "4", "--quiet"]) == 0
    )
    images = read_idx(fashion_mnist_files(FASHION_MNIST_DIR, "train")[0])
    for key, files in read_set(out).items():
        index = int(key.rsplit("-", 1)[1])
        expected = np.asarray(PIL.Image.fromarray(images[index]).resize((64, 64), PIL.Image.Resampling.BICUBIC))
        rgb = pixels(files["png"])
        assert rgb.shape == (64, 64, 3)
        np.testing.assert_array_equal(rgb[..., 1], expected)


@needs_fmnist
def test_fashion_mnist_subsets_keep_the_chosen_classes_and_n_per_class_drawn_from_the_seed(tmp_path: Path) -> None:
    def labels(*args: str) -> dict[str, int]:
        out = tmp_path / "-".join(args).replace(",", "_")
        cmd = ["--source", "fashion-mnist", "--split", "test", "--image-size", "28", "--output", str(out), "--quiet"]
        assert main([*cmd, *args]) == 0
        return {key: int(files["cls"]) for key, files in read_set(out).items()}

    target = labels("--classes", "5,6,7,8,9")
    assert len(target) == 5000 and set(target.values()) == {5, 6, 7, 8, 9}
    few = labels("--classes", "5,6,7,8,9", "--per-class", "3", "--shuffle-seed", "0")
    assert sorted(few.values()) == [c for c in (5, 6, 7, 8, 9) for _ in range(3)]
    assert few.keys() <= target.keys()
    assert few == labels("--per-class", "3", "--classes", "5,6,7,8,9", "--shuffle-seed", "0")  # the same draw
    other = labels("--classes", "5,6,7,8,9", "--per-class", "3", "--shuffle-seed", "1")
    assert sorted(other.values()) == sorted(few.values()) and other.keys() != few.keys()  # another seed, others


def test_rerun_refuses_existing_output_unless_overwrite(
    tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "set"
    base = ["--source", "imagefolder", "--input", str(image_folder), "--output", str(out), "--quiet"]
    assert main([*base, "--samples-per-shard", "7"]) == 0
    assert len(list(out.glob("*.tar"))) == 9
    assert main([*base, "--samples-per-shard", "30"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json already exists" in err and "--overwrite" in err
    assert len(read_manifest(str(out)).shards) == 9  # untouched
    assert main([*base, "--samples-per-shard", "30", "--overwrite"]) == 0
    # The old set is gone, not mixed with the new one.
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert read_manifest(str(out)).num_samples == 60


def test_manifest_is_written_last_so_a_failed_write_leaves_none(tmp_path: Path, image_folder: Path) -> None:
    folder = tmp_path / "folder"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(4):
            (folder / c / f"{i}.png").write_bytes((image_folder / "class0" / f"img{i:03d}.png").read_bytes())
    (folder / "b" / "3.png").write_bytes(b"this is not a png")  # the last image in source order
    out = tmp_path / "set"
    config = WriterConfig(str(out), samples_per_shard=2, shuffle_seed=None, progress=False)
    with pytest.raises(ValueError, match=r"3\.png: cannot read image"):
        write_shards(ImageFolderSource(folder), config)
    assert len(list(out.glob("*.tar"))) == 4  # the shards before the failure were written ...
    assert not (out / "manifest.json").exists()  # ... but the set is not marked complete


def test_imagefolder_labels_and_size_based_rollover(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "set"
    limit_mb = 0.02  # ~20 kB: a few tiny samples per shard
    config = WriterConfig(str(out), shard_size_mb=limit_mb, image_format="jpg", progress=False)
    manifest = write_shards(ImageFolderSource(image_folder, image_size=8), config)
    assert len(manifest.shards) > 2
    assert all(s.num_bytes <= limit_mb * 1024 * 1024 for s in manifest.shards)
    assert manifest.source["classes"] == ["class0", "class1", "class2"]
    for key, files in read_set(out).items():
        index = int(key.split("-", 1)[0])  # index in sorted (class, file) order: 20 images per class
        assert int(files["cls"]) == index // 20
        assert pixels(files["jpg"]).shape == (8, 10, 3)  # 12x10 -> shorter side 8, aspect kept


def test_coco_boxes_masks_and_labels_are_rescaled_with_the_image(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    PIL.Image.new("RGB", (20, 16), (10, 20, 30)).save(images / "a.jpg")
    PIL.Image.new("RGB", (10, 10), (1, 2, 3)).save(images / "b.jpg")
    mask = np.zeros((16, 20), dtype=np.uint8)
    mask[4:12, 6:14] = 1  # 8x8 square, area 64
    rle = mask_utils.encode(np.asfortranarray(mask))
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 20, "height": 16}, {"id": 9, "file_name": "b.jpg"}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 11, "name": "dog"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 11,
                "bbox": [2, 2, 4, 4],
                "area": 16,
                "iscrowd": 0,
                "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]],
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "bbox": [6, 4, 8, 8],
                "area": 64,
                "iscrowd": 0,
                "segmentation": {"size": [16, 20], "counts": rle["counts"].decode("ascii")},
            },
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    out = tmp_path / "set"
    args = ["--source", "coco", "--input", str(tmp_path / "instances.json"), "--output", str(out)]
    assert main([*args, "--image-size", "8", "--no-shuffle", "--quiet"]) == 0
    samples = read_set(out)
    (key_a, a), (_, b) = sorted(samples.items())
    meta = json.loads(a["json"])
    assert pixels(a["jpg"]).shape == (8, 10, 3)  # 20x16 scaled by 0.5; a JPEG source stays JPEG
    assert meta["labels"] == [1, 0] and meta["category_ids"] == [11, 3]
    assert meta["boxes"] == [[1.0, 1.0, 2.0, 2.0], [3.0, 2.0, 4.0, 4.0]]
    assert meta["segmentation"][0] == [[1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0]]
    small = mask_utils.decode({"size": meta["segmentation"][1]["size"], "counts": meta["segmentation"][1]["counts"]})
    assert small.shape == (8, 10) and small.sum() == 16 and small[2:6, 3:7].all()
    assert int(a["cls"]) == 0  # the largest object (the 'cat' square) names the image
    assert int(b["cls"]) == -1 and json.loads(b["json"])["boxes"] == []
    source = read_manifest(str(out)).source
    assert source["categories"] == [{"id": 3, "name": "cat", "label": 0}, {"id": 11, "name": "dog", "label": 1}]
    assert key_a.endswith("-a")
    assert CocoSource(tmp_path / "instances.json").image_root == images


def _photo_folder(root: Path) -> dict[str, bytes]:
    """Two classes of smooth 'photos': JPEGs (quality 90), a PNG, and a JPEG whose name says .png. Returns the
    original bytes by file stem."""
    originals = {}
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            yy, xx = np.mgrid[0:60, 0:80]
            pixels = np.stack([(xx * (i + 1) + c * 40) % 256, (yy * 3 + i * 20) % 256, (xx + yy) % 256], -1)
            image = PIL.Image.fromarray(pixels.astype(np.uint8))
            stem = f"img{i}"
            buf = io.BytesIO()
            if i == 0:
                image.save(buf, format="PNG")
                name = f"{stem}.png"
            elif i == 1:
                image.save(buf, format="JPEG", quality=90)
                name = f"{stem}.png"  # a JPEG that claims to be a PNG
            else:
                image.save(buf, format="JPEG", quality=90)
                name = f"{stem}.jpg"
            (root / f"c{c}" / name).write_bytes(buf.getvalue())
            originals[f"c{c}/{stem}"] = buf.getvalue()
    return originals


def test_without_resize_the_files_go_into_the_shards_as_they_are(tmp_path: Path) -> None:
    originals = _photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    write_shards(ImageFolderSource(tmp_path / "photos"), WriterConfig(str(out), samples_per_shard=5, progress=False))
    samples = read_set(out)
    assert len(samples) == 12
    for key, files in samples.items():
        (ext,) = [e for e in files if e != "cls"]
        original = originals[f"c{int(files['cls'])}/{key.rsplit('-', 1)[1]}"]
        assert files[ext] == original, f"{key}: the stored bytes are not the original file's"
        assert ext == ("png" if key.endswith("img0") else "jpg"), (key, ext)  # the header decides, not the name


def test_resizing_keeps_jpeg_as_jpeg_and_lossless_as_png(tmp_path: Path) -> None:
    _photo_folder(tmp_path / "photos")
    out = tmp_path / "shards"
    source = ImageFolderSource(tmp_path / "photos", image_size=32)
    write_shards(source, WriterConfig(str(out), samples_per_shard=5, jpeg_quality=80, progress=False))
    exts = sorted({e for files in read_set(out).values() for e in files if e not in ("cls", "json")})
    assert exts == ["jpg", "png"]
    forced = tmp_path / "forced"
    write_shards(source, WriterConfig(str(forced), samples_per_shard=5, image_format="png", progress=False))
    assert {e for files in read_set(forced).values() for e in files if e != "cls"} == {"png"}


def test_parallel_writing_gives_the_same_shards_and_manifest(tmp_path: Path) -> None:
    _photo_folder(tmp_path / "photos")
    manifests = {}
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        source = ImageFolderSource(tmp_path / "photos", image_size=24)
        manifests[workers] = write_shards(
            source, WriterConfig(str(out), shard_size_mb=0.004, workers=workers, progress=False)
        )
    assert len(manifests[1].shards) > 2
    assert manifests[1].shards == manifests[3].shards  # names, counts, sizes and sha256 of every shard
    assert manifests[1].source == manifests[3].source
