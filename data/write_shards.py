"""Convert an image folder, a list file, Fashion-MNIST or a COCO set into WebDataset shards (command line).

    python -m data.write_shards --source fashion-mnist --output s3://bucket/fmnist/train --image-size 64
    python -m data.write_shards --source imagefolder --input /data/imagenet/train --output /data/shards/in1k-train \\
        --image-size 256 --format jpg --shard-size-mb 256

The output (any fsspec URL) gets ``{prefix}-NNNNNN.tar`` shards and, last, ``manifest.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from data.sources import SOURCE_KINDS, build_source
from data.writer import OutputExistsError, WriterConfig, write_shards


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m data.write_shards", description=__doc__.split("\n")[0])
    p.add_argument("--source", required=True, choices=SOURCE_KINDS, help="kind of input")
    p.add_argument(
        "--input",
        help="image folder root, list file, Fashion-MNIST idx directory (default: the Debian package's), "
        "or COCO annotation JSON",
    )
    p.add_argument("--output", required=True, help="output directory URL (path, file://, s3://, ...)")
    p.add_argument("--image-size", type=int, help="shorter side in pixels (Fashion-MNIST: square, default 64)")
    p.add_argument(
        "--format",
        choices=("auto", "png", "jpg"),
        default="auto",
        help="auto (default): files kept as they are without --image-size, else PNG for lossless sources and JPEG "
        "for JPEG sources; png/jpg: re-encode everything",
    )
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality of re-encoded JPEGs (default 95)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--shard-size-mb", type=float, help="target shard size in MB (default 100)")
    size.add_argument("--samples-per-shard", type=int, help="samples per shard")
    p.add_argument("--split", default="train", choices=("train", "test"), help="Fashion-MNIST split")
    p.add_argument("--image-root", help="COCO image folder (default: images/ beside the JSON)")
    p.add_argument("--prefix", help="shard name prefix (default: the split for Fashion-MNIST, else 'shard')")
    p.add_argument(
        "--classes", type=lambda text: [int(c) for c in text.split(",")],
        help="Fashion-MNIST: keep these classes only, e.g. 5,6,7,8,9",
    )  # fmt: skip
    p.add_argument(
        "--per-class", type=int,
        help="Fashion-MNIST: keep N images of each class, drawn with --shuffle-seed (a few-label set)",
    )  # fmt: skip
    p.add_argument("--limit", type=int, help="write only the first N samples (after shuffling)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the write order shuffle (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set at --output")
    p.add_argument("--workers", type=int, default=1, help="processes that load and encode images (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; return the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if args.image_size is not None and args.image_size < 1:
        print(f"error: --image-size must be >= 1, got {args.image_size}", file=sys.stderr)
        return 2
    try:
        source = build_source(
            args.source, args.input, image_size=args.image_size, split=args.split, image_root=args.image_root,
            classes=args.classes, per_class=args.per_class, seed=args.shuffle_seed,
        )  # fmt: skip
        config = WriterConfig(
            output=args.output,
            image_format=args.format,
            jpeg_quality=args.jpeg_quality,
            shard_size_mb=args.shard_size_mb,
            samples_per_shard=args.samples_per_shard,
            prefix=args.prefix or (args.split if args.source == "fashion-mnist" else "shard"),
            overwrite=args.overwrite,
            shuffle_seed=None if args.no_shuffle else args.shuffle_seed,
            limit=args.limit,
            progress=not args.quiet,
            workers=args.workers,
        )
        info = {
            "input": args.input or str(getattr(source, "root", "")),
            "image_size": getattr(source, "image_size", args.image_size),
        }
        manifest = write_shards(source, config, source_info=info)
    except (OutputExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{manifest.num_samples} samples in {len(manifest.shards)} shards at {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
