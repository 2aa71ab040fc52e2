"""Shards people already have: written by ``webdataset.ShardWriter`` or laid out like img2dataset's output, without
our manifest. They are indexed from tar headers and train through the launcher; our own shards read back through a
plain webdataset pipeline."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import webdataset as wds

from data.index_shards import expand_source, index_shards
from data.index_shards import main as index_main
from data.loader import decode_sample
from data.manifest import MANIFEST_NAME, read_manifest, resolve_shards
from data.reader import RawSample
from data.storage import MissingShardError
from tests.support.env import http_server
from tests.support.launch import launch, logged_steps
from tests.support.shards import write_folder_shards


def _jpeg(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def writer_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """100 labeled JPEG samples in shards of 40 written by webdataset's own ShardWriter (3 shards: 40, 40, 20)."""
    root = tmp_path_factory.mktemp("wds")
    keys = [f"img{i:05d}" for i in range(100)]
    with wds.ShardWriter(str(root / "part-%06d.tar"), maxcount=40, verbose=0) as sink:
        for i, key in enumerate(keys):
            sink.write({"__key__": key, "jpg": _jpeg(i), "cls": i % 10, "json": {"caption": f"sample {i}"}})
    return root, keys


def _img2dataset_tar(path: Path, start: int, count: int) -> list[str]:
    """img2dataset's layout: ``{shard}{index}.jpg|.txt|.json`` per sample, no ``.cls`` (the class only in the
    ``.json``); upper-case extensions too."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + count):
            key = f"{i:09d}"
            ext = "JPEG" if i % 3 == 0 else "jpg"
            meta = json.dumps({"caption": "a photo", "label": i % 10}).encode()
            for name, data in ((f"{key}.{ext}", _jpeg(i)), (f"{key}.txt", b"a caption"), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            keys.append(key)
    return keys


def test_index_counts_samples_from_headers_like_webdataset(writer_shards: tuple[Path, list[str]]) -> None:
    root, _ = writer_shards
    urls = expand_source(str(root / "part-{000000..000002}.tar"))
    manifest = index_shards(urls, progress=False)
    assert [s.num_samples for s in manifest.shards] == [40, 40, 20]
    assert [s.num_bytes for s in manifest.shards] == [Path(u).stat().st_size for u in urls]
    assert manifest.source["extensions"] == ["cls", "jpg", "json"]
    # The same count webdataset's own iteration gives, shard by shard.
    assert [sum(1 for _ in wds.WebDataset(u, shardshuffle=False)) for u in urls] == [40, 40, 20]
    # By hand: a directory without a manifest gets one; asking for hashes fills them in.
    assert index_main([str(root), "--sha256"]) == 0
    written = read_manifest(str(root))
    assert written.num_samples == 100 and all(len(s.sha256) == 64 for s in written.shards)
    (root / MANIFEST_NAME).unlink()  # the launch test below starts from a bare directory again


def test_an_unindexed_pattern_is_a_clear_error(writer_shards: tuple[Path, list[str]]) -> None:
    pattern = str(writer_shards[0] / "part-{000000..000001}.tar")
    with pytest.raises(MissingShardError, match=r"python -m data.index_shards"):
        resolve_shards(pattern)


@pytest.mark.slow
def test_shardwriter_shards_pretrain_through_the_launcher(
    writer_shards: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """A brace pattern over ShardWriter shards: the launcher indexes it once (cached beside the shards), and one
    epoch serves every sample once: 100 samples in batches of 8 on 2 ranks give 6 steps of 16 distinct keys."""
    root, keys = writer_shards
    pattern = str(root / "part-{000000..000002}.tar")
    overrides = [
        f"data.train_url={pattern}",
        "data.batch_size=8",
        "schedule.max_steps=6",
        "tracking.sample_ledger=true",
    ]
    assert launch(tmp_path / "run", *overrides, ranks=2) == 0
    (index,) = root.glob("manifest-index-*.json")  # cached beside the shards, where every later run finds it
    assert read_manifest(str(index)).num_samples == 100
    served = [
        key
        for ledger in sorted((tmp_path / "run" / "ledger").glob("rank_*.jsonl"))
        for line in ledger.read_text().splitlines()
        for key in json.loads(line)["keys"]
    ]
    assert len(served) == 96 and len(set(served)) == 96  # 6 steps x 2 ranks x 8, no sample twice
    assert set(served) <= set(keys)  # the keys ShardWriter wrote, as webdataset names them


@pytest.mark.slow
def test_img2dataset_layout_pretrains_and_finetunes_with_the_json_label(tmp_path: Path) -> None:
    shards = tmp_path / "img2dataset"
    shards.mkdir()
    _img2dataset_tar(shards / "00000.tar", 0, 30)
    _img2dataset_tar(shards / "00001.tar", 30, 30)
    assert launch(tmp_path / "pre", f"data.train_url={shards}", "data.batch_size=8", "schedule.max_steps=3") == 0
    assert read_manifest(str(shards)).num_samples == 60  # a whole directory: its manifest.json, beside the shards
    finetune = [f"data.train_url={shards}", f"data.val_url={shards}", "data.batch_size=8", "schedule.max_steps=2",
                "model.num_classes=10", "model.pretrained=null"]  # fmt: skip
    assert launch(tmp_path / "ft", *finetune, config="demo_finetune") != 0  # no .cls and no label field named
    (failure_file,) = (tmp_path / "ft" / "failures").glob("rank_*.txt")
    assert "carry no .cls label" in failure_file.read_text() and "data.label_field" in failure_file.read_text()
    assert launch(tmp_path / "ft2", *finetune, "data.label_field=label", config="demo_finetune") == 0
    metrics = json.loads((tmp_path / "ft2" / "export" / "metrics.json").read_text())
    assert metrics["loader_samples_skipped"] == 0 and metrics["val_images"] == 60  # every sample had its label


@pytest.mark.slow
def test_a_read_only_http_mirror_mixed_with_a_local_set_trains_and_logs_each_source(
    writer_shards: tuple[Path, list[str]], shard_dir: str, tmp_path: Path
) -> None:
    """ShardWriter shards on a read-only HTTP server (a real ``http.server``, like a dataset hub's mirror): the index
    cannot be written beside them, so the launcher writes it into the run directory, where the ranks find it. They
    are mixed 1:1 with a local set (100 vs 60 samples); the per-source counts of all ranks are logged and continue
    across a restart."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for tar in sorted(writer_shards[0].glob("part-*.tar")):
        shutil.copy(tar, mirror / tar.name)
    run = tmp_path / "run"
    with http_server(mirror) as base:
        mixture = f'{{"{base}/part-{{000000..000002}}.tar": 1, "{shard_dir}": 1}}'
        common = [f"data.train_url={mixture}", "data.batch_size=8", "data.num_workers=1"]
        assert launch(run, *common, "schedule.max_steps=3", ranks=2) == 0
        assert not list(mirror.glob("*.json"))  # nothing could be written there
        (index,) = (run / "index").glob("manifest-index-*.json")
        assert read_manifest(str(index)).num_samples == 100
        first = logged_steps(run)
        assert launch(run, *common, "schedule.max_steps=6", ranks=2) == 0  # resumes at step 3
    records = logged_steps(run)
    for record in records:
        assert record["samples_part"] + record["samples_set"] == record["step"] * 16  # 2 ranks x 8, all counted
    assert abs(first[-1]["samples_part"] - first[-1]["samples_set"]) <= 4  # 1:1, although 100 vs 60 samples
    assert records[-1]["step"] == 6 and records[-1]["samples_part"] + records[-1]["samples_set"] == 96


def test_our_shards_read_through_a_plain_webdataset_pipeline(image_folder: Path, tmp_path: Path) -> None:
    """Interoperability the other way: keys, decoded images and labels of our writer's shards, as webdataset sees
    them, equal what our writer put in."""
    out = tmp_path / "ours"
    manifest = write_folder_shards(image_folder, str(out), samples_per_shard=25)
    urls = [str(out / s.name) for s in manifest.shards]
    theirs = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False).decode("pil")}
    ours: dict[str, tuple[np.ndarray, int]] = {}
    for url in urls:  # our decoding of the same members
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
        for key, files in members.items():
            image, label, _ = decode_sample(RawSample(key, files, url), num_classes=3)
            ours[key] = (np.asarray(image), label)
    assert theirs.keys() == ours.keys() and len(ours) == manifest.num_samples == 60
    for key, sample in theirs.items():
        image = next(sample[e] for e in ("png", "jpg") if e in sample)
        assert np.array_equal(np.asarray(image.convert("RGB")), ours[key][0]), key
        assert sample["cls"] == ours[key][1]
    assert sorted({label for _, label in ours.values()}) == [0, 1, 2]
