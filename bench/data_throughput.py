"""Does the loader keep a GPU fed? Images/s of four input pipelines on the same photographs, side by side.

Data: ``--images`` JPEGs of 500x375 at quality 90 (the size and quality of an average ImageNet photo), cut with
random crops, flips and colour shifts from the real photographs installed Python packages ship (matplotlib's
``grace_hopper.jpg``, scikit-learn's ``china.jpg`` and ``flower.jpg``), in an ImageFolder layout of 10 classes.
Every arm applies the same transform (our ``pretrain_transform``: RandomResizedCrop 224 bicubic, flip, normalize)
with the same worker count and batch size:

- ``ImageFolder``: torchvision's ImageFolder + DataLoader;
- ``webdataset``: a plain ``webdataset.WebDataset(urls).decode("pil")`` pipeline + DataLoader on our shards;
- ``ours, local``: our loader on shards written from the folder (files kept as they are: the same JPEG bytes),
  decoding as pretraining does (torchvision's decoders into uint8 tensors, the v2 transform on tensors);
- ``ours, S3``: the same on a real S3 API (moto's server on 127.0.0.1) through s3fs;
- ``ours, PIL``: our loader decoding to PIL images as the other arms do (what fine-tuning's PIL-based
  RandAugment needs).

Each arm reads ``--epochs`` passes after one warm-up batch; arms run interleaved, ``--repeats`` rounds, best kept.
Targets: ours >= 1.0x ImageFolder (1.3x with a cheaper decode) and >= 0.95x webdataset; S3 >= 0.8x local.

    python bench/data_throughput.py [--images 2000] [--workers 2] [--batch 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import PIL.Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from torchvision.datasets import ImageFolder  # noqa: E402

from data.batch import Batch  # noqa: E402
from data.loader import Decode, LoaderConfig, build_loader  # noqa: E402
from data.sources import ImageFolderSource  # noqa: E402
from data.transforms import pretrain_transform  # noqa: E402
from data.writer import WriterConfig, write_shards  # noqa: E402
from tests.support.env import moto_server  # noqa: E402  (the tests' local S3 endpoint)


def shipped_photos() -> list[PIL.Image.Image]:
    """The real photographs that installed packages ship."""
    import matplotlib
    import sklearn

    paths = [
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
        Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
        Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg",
    ]
    return [PIL.Image.open(p).convert("RGB") for p in paths if p.exists()]


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 500x375 JPEGs (quality 90) in 10 class folders, cut from the shipped photographs."""
    photos = shipped_photos()
    if not photos:
        raise SystemExit("no sample photographs found (matplotlib or scikit-learn missing)")
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        scale = rng.uniform(0.4, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize((500, 375), PIL.Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2, size=3)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:05d}.jpg", quality=90)
    return root


def writer_rates(folder: Path, tmp: Path, workers: int) -> list[tuple[str, float]]:
    """Images/s written from the folder: files kept as they are vs re-encoded (resized to 256, JPEG q95), one process
    vs ``workers``."""
    rows = []
    for mode, size in (("kept as they are", None), ("re-encoded at 256", 256)):
        for n in sorted({1, workers}):
            out = tmp / f"write-{size}-{n}"
            source = ImageFolderSource(folder, image_size=size)
            started = time.perf_counter()
            write_shards(source, WriterConfig(str(out), samples_per_shard=250, workers=n, progress=False))
            rows.append((f"{mode}, {n} process{'es' if n > 1 else ''}", len(source) / (time.perf_counter() - started)))
            shutil.rmtree(out)
    return rows


def rate(batches: Iterable[object], images: int) -> float:
    """Images/s over the batches after the first (warm-up: worker start, first shard open)."""
    iterator = iter(batches)
    next(iterator)
    started = time.perf_counter()
    seen = 0
    for batch in iterator:
        seen += len(batch.images if isinstance(batch, Batch) else batch[0])  # type: ignore[index]
    return seen / (time.perf_counter() - started) if seen else float("nan")


def image_folder_arm(root: Path, args: argparse.Namespace) -> float:
    dataset = ImageFolder(str(root), transform=pretrain_transform(224))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True, persistent_workers=False
    )
    return rate(loader, len(dataset))


def webdataset_arm(urls: list[str], args: argparse.Namespace) -> float:
    transform = pretrain_transform(224)
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
        .batched(args.batch, partial=False)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers)
    return rate(loader, args.images)


def ours_arm(url: str, args: argparse.Namespace, decode: Decode = "tensor") -> float:
    loader = build_loader(
        url,
        LoaderConfig(batch_size=args.batch, num_workers=args.workers, decode=decode),
        transform=pretrain_transform(224),
    )
    return rate(loader, args.images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=250)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="data_throughput_"))
    try:
        t0 = time.perf_counter()
        folder = make_folder(tmp / "folder", args.images)
        shards = tmp / "shards"
        write_shards(
            ImageFolderSource(folder),
            WriterConfig(str(shards), samples_per_shard=args.samples_per_shard, progress=False),
        )
        urls = sorted(str(p) for p in shards.glob("*.tar"))
        print(f"# {args.images} JPEGs 500x375 q90 made and written as shards in {time.perf_counter() - t0:.0f}s")
        with moto_server():
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            s3 = boto3.client("s3")
            for path in shards.iterdir():
                s3.upload_file(str(path), "bench", f"shards/{path.name}")
            arms: dict[str, list[float]] = {
                "ImageFolder": [],
                "webdataset": [],
                "ours, local": [],
                "ours, S3": [],
                "ours, PIL": [],
            }
            for _ in range(args.repeats):
                arms["ImageFolder"].append(image_folder_arm(folder, args))
                arms["webdataset"].append(webdataset_arm(urls, args))
                arms["ours, local"].append(ours_arm(str(shards), args))
                arms["ours, S3"].append(ours_arm("s3://bench/shards", args))
                arms["ours, PIL"].append(ours_arm(str(shards), args, decode="pil"))
        base = max(arms["ImageFolder"])
        print(
            f"\n# RandomResizedCrop 224 + flip + normalize, batch {args.batch}, {args.workers} workers, "
            f"{os.cpu_count()} cores, best of {args.repeats}"
        )
        print(f"{'pipeline':<14} {'images/s':>9} {'vs ImageFolder':>15}   runs")
        for name, rates in arms.items():
            best = max(rates)
            print(f"{name:<14} {best:>9.1f} {best / base:>14.2f}x   {', '.join(f'{r:.1f}' for r in rates)}")
        ours, theirs, s3 = max(arms["ours, local"]), max(arms["webdataset"]), max(arms["ours, S3"])
        print(
            f"\nours / ImageFolder {ours / base:.2f}x (target >= 1.3); ours / webdataset {ours / theirs:.2f}x "
            f"(target >= 0.95); S3 / local {s3 / ours:.2f}x (target >= 0.8)"
        )
        print(f"\n# writing shards from the folder ({args.images} JPEGs)")
        print(f"{'writer':<40} {'images/s':>9}")
        for name, value in writer_rates(folder, tmp, args.workers):
            print(f"{name:<40} {value:>9.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
