"""Shared fixtures of the data tests: a real S3 endpoint (moto server), tiny image folders and shard sets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

from data.manifest import Manifest
from data.sources import ImageFolderSource
from data.writer import WriterConfig, write_shards

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 API served by ``moto_server`` on a free local port; the AWS environment points at it."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on port {port}") from None
            time.sleep(0.05)
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket on the moto endpoint, as ``s3://name``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


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
