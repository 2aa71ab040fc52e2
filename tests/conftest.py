"""Fixtures shared by all test packages: a real S3 endpoint (moto server) and real Fashion-MNIST shards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support.env import moto_server
from tests.support.shards import detection_shards, fmnist_shards_of


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker's share of the cores: its runs' ranks (the launcher honours OMP_NUM_THREADS) and its
    in-process torch. Two workers whose 1-rank runs each took both cores ran 13x slower (OpenMP threads spinning
    against each other; bench/RESULTS.md, the test suite)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end tests first, each group in its order: pytest-xdist hands tests out in this order, so
    the long ones start early and the short ones fill the workers' last minutes instead of one long test running
    alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 API served by ``moto_server`` on a free local port; the AWS environment points at it."""
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A fresh, empty bucket on the moto endpoint, as ``s3://name``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """768 real Fashion-MNIST training images at 64 px in 6 shards (Debian's dataset-fashion-mnist package)."""
    return fmnist_shards_of(tmp_path_factory, "train", limit=768, per_shard=128)


@pytest.fixture(scope="session")
def fmnist_test_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """500 real Fashion-MNIST test-split images at 64 px in 2 shards (validation data for fine-tuning; 500 is no
    multiple of common batch sizes, so evaluation pads its last batch)."""
    return fmnist_shards_of(tmp_path_factory, "test", limit=500, per_shard=250)


@pytest.fixture(scope="session")
def det_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """32 training and 8 validation canvases of 64 px with 1-3 real Fashion-MNIST items each, as shards."""
    return detection_shards(tmp_path_factory.mktemp("fmnist-det"))
