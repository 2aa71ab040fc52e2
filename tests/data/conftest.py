"""Shared fixtures of the data tests: a real S3 endpoint (moto server), tiny image folders and shard sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.shards import make_image_folder, write_folder_shards


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 20 images of 12x10 px."""
    return make_image_folder(tmp_path_factory.mktemp("folder"), classes=3, per_class=20)


@pytest.fixture(scope="session")
def shard_dir(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """60 samples in shards of 7 (the last one has 4): a read-only set shared by loader tests."""
    out = tmp_path_factory.mktemp("shards") / "set"
    write_folder_shards(image_folder, str(out), samples_per_shard=7)
    return str(out)


@pytest.fixture(scope="session")
def indexed_dir(shard_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same 60 samples as tars without our manifest, indexed from their headers (data.index_shards)."""
    import shutil

    from data.index_shards import build_index

    out = tmp_path_factory.mktemp("indexed") / "set"
    out.mkdir()
    for tar in Path(shard_dir).glob("*.tar"):
        shutil.copy(tar, out / tar.name)
    build_index(str(out))
    return str(out)


@pytest.fixture(params=["written", "indexed"])
def any_shard_dir(request: pytest.FixtureRequest) -> str:
    """Each loader promise holds for our writer's shard sets and for indexed ones alike."""
    return str(request.getfixturevalue("shard_dir" if request.param == "written" else "indexed_dir"))
