"""Shards on a real S3 endpoint (moto server): write with the CLI, stream back, fail clearly when unreachable."""

from __future__ import annotations

import importlib
import re
import socket
import tarfile
import time
from pathlib import Path

import pytest
import torch

from data.loader import IGNORE_LABEL, LoaderConfig, build_loader
from data.manifest import read_manifest
from data.storage import DataSourceError, MissingShardError, RetryPolicy, register_fsspec_schemes
from data.transforms import pretrain_transform
from data.write_shards import main
from tests.support.shards import write_folder_shards


def test_cli_writes_to_s3_and_the_loader_streams_it_back(s3_bucket: str, image_folder: Path, tmp_path: Path) -> None:
    url = f"{s3_bucket}/in/train"
    args = ["--source", "imagefolder", "--input", str(image_folder), "--output", url, "--image-size", "8"]
    assert main([*args, "--samples-per-shard", "9", "--quiet"]) == 0
    manifest = read_manifest(url)
    assert manifest.num_samples == 60 and len(manifest.shards) == 7

    # webdataset's own gopen now opens s3:// through fsspec (no pipe: subprocess).
    register_fsspec_schemes()
    gopen = importlib.import_module("webdataset.gopen").gopen
    with gopen(f"{url}/{manifest.shards[0].name}", "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        assert len({m.name.split(".")[0] for m in tar}) == 9

    # The same samples written locally stream identically (keys, pixels after augmentation, labels).
    local = str(tmp_path / "local")
    write_folder_shards(image_folder, local, samples_per_shard=9)
    seen = []
    for rank in range(2):
        streams = []
        for source in (url, local):
            loader = build_loader(
                source,
                LoaderConfig(
                    batch_size=4, rank=rank, world_size=2, num_workers=2, seed=3, remainder="pad", verify=True
                ),
                transform=pretrain_transform(8),
            )
            streams.append([(b.keys, b.images, b.labels) for b in loader])
        s3_batches, local_batches = streams
        assert len(s3_batches) == len(local_batches) == 8
        for (k1, x1, y1), (k2, x2, y2) in zip(s3_batches, local_batches, strict=True):
            assert k1 == k2 and torch.equal(x1, x2) and torch.equal(y1, y2)
        seen += [
            k for keys, _, y in s3_batches for k, label in zip(keys, y.tolist(), strict=True) if label != IGNORE_LABEL
        ]
    assert len(seen) == len(set(seen)) == 60


def test_forkserver_workers_stream_from_s3(s3_bucket: str, image_folder: Path) -> None:
    url = f"{s3_bucket}/set"
    write_folder_shards(image_folder, url, samples_per_shard=20)
    loader = build_loader(url, LoaderConfig(batch_size=10, num_workers=1, multiprocessing_context="forkserver"))
    batches = [b.labels for b in loader]
    assert len(batches) == 6 and loader.stats.samples == 60 and loader.stats.skipped == 0


def test_missing_bucket_and_missing_shard_errors_name_the_url(s3_bucket: str, image_folder: Path) -> None:
    with pytest.raises(MissingShardError, match=re.escape("s3://no-such-bucket-4242/set/manifest.json")):
        build_loader("s3://no-such-bucket-4242/set", LoaderConfig(batch_size=4))
    url = f"{s3_bucket}/set"
    manifest = write_folder_shards(image_folder, url, samples_per_shard=20)
    import boto3

    boto3.client("s3").delete_object(Bucket=s3_bucket[5:], Key=f"set/{manifest.shards[1].name}")
    with pytest.raises(MissingShardError, match=re.escape(f"{url}/{manifest.shards[1].name}")):
        build_loader(url, LoaderConfig(batch_size=4))


def test_unreachable_endpoint_fails_fast_with_the_url(moto_endpoint: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "config_kwargs": {"connect_timeout": 0.5, "read_timeout": 0.5, "retries": {"max_attempts": 1}},
    }
    start = time.monotonic()
    with pytest.raises(DataSourceError, match=r"s3://bucket/set/manifest\.json after 2 attempts"):
        build_loader(
            "s3://bucket/set",
            LoaderConfig(batch_size=4, storage_options=options, retry=RetryPolicy(attempts=2, base_delay_s=0.05)),
        )
    assert time.monotonic() - start < 20


def test_an_endpoint_with_nothing_listening_fails_in_seconds_with_default_settings(moto_endpoint: str) -> None:
    """Only our RetryPolicy retries (5 tries, 7.5 s of backoff): s3fs's and botocore's own retry loops inside each
    try took the same error to ~50 s before."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DataSourceError, match=r"s3://bucket/set/manifest\.json after 5 attempts"):
        build_loader(
            "s3://bucket/set", LoaderConfig(batch_size=4, storage_options={"endpoint_url": f"http://127.0.0.1:{port}"})
        )
    assert time.monotonic() - start < 20
