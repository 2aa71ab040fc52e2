"""Fixtures shared by all test packages: a real S3 endpoint (moto server) and real Fashion-MNIST shards."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from data.sources import FASHION_MNIST_DIR, build_source
from data.writer import WriterConfig, write_shards

REQUIRE_ALL = "TESTS_REQUIRE_ALL"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With ``TESTS_REQUIRE_ALL=1`` (CI), a skipped test fails: everything the README calls tested must run there
    (tests marked ``cuda`` or ``bigmem`` excepted on machines without a GPU or the RAM)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    exempt = any(item.get_closest_marker(m) is not None for m in ("cuda", "bigmem"))
    if report.skipped and os.environ.get(REQUIRE_ALL) == "1" and not exempt:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, but {REQUIRE_ALL}=1 requires every test to run: {reason}"


@contextlib.contextmanager
def patched_environ(env: dict[str, str]) -> Iterator[None]:
    """Make os.environ equal to ``env`` for the body, then undo only the keys that changed (so variables other
    fixtures set meanwhile survive)."""
    changed = {k for k in os.environ if k not in env} | {k for k, v in env.items() if os.environ.get(k) != v}
    saved = {k: os.environ.get(k) for k in changed}
    for key in changed:
        if key in env:
            os.environ[key] = env[key]
        else:
            del os.environ[key]
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    try:
        with patched_environ({**os.environ, **AWS_ENV, "AWS_ENDPOINT_URL": endpoint}):
            yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket on the moto endpoint, as ``s3://name``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


def _fmnist_shards(factory: pytest.TempPathFactory, split: str, limit: int, per_shard: int) -> str:
    """The first ``limit`` real Fashion-MNIST images of a split at 64 px, as shards of ``per_shard`` samples."""
    if not Path(FASHION_MNIST_DIR).exists():
        pytest.skip(f"Fashion-MNIST is not installed at {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist")
    out = factory.mktemp("fmnist") / split
    source = build_source("fashion-mnist", None, image_size=64, split=split)
    write_shards(source, WriterConfig(output=str(out), samples_per_shard=per_shard, limit=limit, progress=False))
    return str(out)


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """768 real Fashion-MNIST training images at 64 px in 6 shards (Debian's dataset-fashion-mnist package)."""
    return _fmnist_shards(tmp_path_factory, "train", limit=768, per_shard=128)


@pytest.fixture(scope="session")
def fmnist_test_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """500 real Fashion-MNIST test-split images at 64 px in 2 shards (validation data for fine-tuning; 500 is no
    multiple of common batch sizes, so evaluation pads its last batch)."""
    return _fmnist_shards(tmp_path_factory, "test", limit=500, per_shard=250)
