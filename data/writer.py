"""Write a :class:`~data.sources.Source` as WebDataset tar shards to any fsspec URL, then the manifest.

Each sample becomes ``{key}.png|jpg``, ``{key}.cls`` and, when the source has metadata, ``{key}.json``. Shards roll
over by byte size or sample count. The sha256 and size of each shard are computed while streaming it out (no
second read). ``manifest.json`` is written last, so a crashed write leaves no manifest and is never picked up.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

import numpy as np
import webdataset as wds
from tqdm import tqdm

from data.manifest import Manifest, ShardInfo, manifest_url, read_manifest, write_manifest
from data.sources import Source, SourceSample
from data.storage import join_url, open_url, register_fsspec_schemes, url_to_fs

log = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE_MB = 100.0
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads archives to whole records
_TAR_END = 2 * _TAR_BLOCK  # end-of-archive marker


class OutputExistsError(FileExistsError):
    """The output already holds a complete shard set (its manifest exists) and ``overwrite`` was not asked for."""


@dataclass(frozen=True)
class WriterConfig:
    """Where and how shards are written."""

    output: str
    """Directory URL for shards and ``manifest.json`` (local path, ``file://``, ``s3://`` or any fsspec URL)."""
    image_format: Literal["auto", "png", "jpg"] = "auto"
    """``auto``: keep each file's bytes when no resize is asked (the source hands them over), else re-encode lossless
    sources as PNG and JPEG sources as JPEG; ``png`` or ``jpg``: re-encode every image in that format."""
    shard_size_mb: float | None = None
    """Roll over to a new shard before its file would exceed this many MB (default 100 when no count is given);
    only a single sample larger than that makes a bigger shard."""
    samples_per_shard: int | None = None
    """Roll over after this many samples (exclusive with ``shard_size_mb``)."""
    prefix: str = "shard"
    """Shard file name prefix: ``{prefix}-000000.tar``."""
    overwrite: bool = False
    """Replace an existing complete set; without it an existing manifest is an error."""
    jpeg_quality: int = 95
    """JPEG quality of re-encoded JPEGs."""
    shuffle_seed: int | None = 0
    """Permute the source order with this seed before writing (class folders are sorted); None keeps it."""
    limit: int | None = None
    """Write only the first ``limit`` samples (after shuffling): small sets for tests and demos."""
    progress: bool = True
    """Show a progress bar on stderr."""
    workers: int = 1
    """Processes that load and encode samples (the main process writes the tars in order, so the shards and the
    manifest are the same for any number)."""
    storage_options: Mapping[str, Any] | None = None
    """Extra fsspec options (e.g. ``{"endpoint_url": ...}``); the AWS environment is used when absent."""

    def __post_init__(self) -> None:
        if self.shard_size_mb is not None and self.samples_per_shard is not None:
            raise ValueError("give either shard_size_mb (--shard-size-mb) or samples_per_shard (--samples-per-shard)")
        if self.shard_size_mb is not None and self.shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")
        if self.samples_per_shard is not None and self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.image_format not in ("auto", "png", "jpg"):
            raise ValueError(f"image_format {self.image_format!r}: choose 'auto', 'png' or 'jpg'")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not self.prefix or "/" in self.prefix or "." in self.prefix:
            raise ValueError(f"prefix {self.prefix!r} must be a plain name without '/' or '.'")

    @property
    def max_shard_bytes(self) -> int | None:
        """Byte budget per shard, or None when shards roll over by count."""
        if self.samples_per_shard is not None:
            return None
        return int((self.shard_size_mb or DEFAULT_SHARD_SIZE_MB) * 1024 * 1024)


class _HashingStream:
    """A write-only stream that forwards to ``inner`` while counting bytes and hashing them."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner = inner
        self.sha256 = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.num_bytes += len(data)
        self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        self.inner.flush()


class _OpenShard:
    """A shard being written."""

    def __init__(self, url: str, name: str, storage_options: Mapping[str, Any] | None) -> None:
        self.url, self.name = url, name
        self.file = open_url(url, "wb", storage_options)
        self.stream = _HashingStream(self.file)
        # mtime fixed: the same input gives byte-identical shards (and hashes) on every run.
        self.tar = wds.TarWriter(self.stream, encoder=False, mtime=0)
        self.num_samples = 0
        self.member_bytes = 0  # headers + padded data so far; the stream itself lags behind tarfile's buffer

    def file_size_with(self, extra: int) -> int:
        """Final file size if a record of ``extra`` member bytes were added and the shard then closed."""
        return -(-(self.member_bytes + extra + _TAR_END) // _TAR_RECORD) * _TAR_RECORD

    def write(self, record: dict[str, Any], size: int) -> None:
        self.tar.write(record)
        self.num_samples += 1
        self.member_bytes += size

    def close(self) -> ShardInfo:
        self.tar.close()
        self.file.close()  # for object stores this completes the upload
        return ShardInfo(self.name, self.num_samples, self.stream.num_bytes, self.stream.sha256.hexdigest())


def encode_sample(sample: SourceSample, image_format: str, jpeg_quality: int = 95) -> dict[str, Any]:
    """The tar members of ``sample``: ``__key__`` plus the image (see :attr:`WriterConfig.image_format`), ``cls``
    and optional ``json``."""
    if "." in sample.key or not sample.key:
        raise ValueError(f"sample key {sample.key!r} must be non-empty and contain no dots")
    if image_format == "auto" and sample.encoded is not None:
        ext, data = sample.encoded
    else:
        ext = image_format if image_format != "auto" else ("png" if sample.lossless else "jpg")
        buf = io.BytesIO()
        if ext == "png":
            sample.rgb().save(buf, format="PNG")
        else:
            sample.rgb().save(buf, format="JPEG", quality=jpeg_quality)
        data = buf.getvalue()
    record: dict[str, Any] = {"__key__": sample.key, ext: data, "cls": str(int(sample.label)).encode("ascii")}
    if sample.meta is not None:
        record["json"] = json.dumps(sample.meta, separators=(",", ":")).encode("utf-8")
    return record


_WORKER: tuple[Source, str, int] | None = None
"""The source and encoding settings of a writer worker process (set by the pool's initializer)."""


def _init_worker(source: Source, image_format: str, jpeg_quality: int) -> None:
    global _WORKER
    _WORKER = (source, image_format, jpeg_quality)


def _encode_index(index: int) -> dict[str, Any]:
    assert _WORKER is not None
    source, image_format, jpeg_quality = _WORKER
    return encode_sample(source.load(index), image_format, jpeg_quality)


def _records(source: Source, order: Sequence[int], config: WriterConfig) -> Iterator[dict[str, Any]]:
    """Encoded records in ``order``: in this process, or loaded and encoded by ``config.workers`` forked processes
    (results come back in order)."""
    if config.workers == 1:
        for index in order:
            yield encode_sample(source.load(int(index)), config.image_format, config.jpeg_quality)
        return
    context = multiprocessing.get_context("fork")  # the workers inherit the source instead of unpickling it
    init = (source, config.image_format, config.jpeg_quality)
    with context.Pool(config.workers, initializer=_init_worker, initargs=init) as pool:
        yield from pool.imap(_encode_index, [int(i) for i in order], chunksize=8)


def _tar_bytes(record: dict[str, Any]) -> int:
    """Bytes a record takes in a tar: a header block per member plus data padded to whole blocks."""
    sizes = [len(v) for k, v in record.items() if not k.startswith("__")]
    return sum(_TAR_BLOCK + -(-n // _TAR_BLOCK) * _TAR_BLOCK for n in sizes)


def _prepare_output(config: WriterConfig) -> None:
    """Refuse an existing complete set unless overwriting; when overwriting remove the old manifest first."""
    murl = manifest_url(config.output)
    fs, mpath = url_to_fs(murl, config.storage_options)
    fs.invalidate_cache()
    if not fs.exists(mpath):
        return
    if not config.overwrite:
        raise OutputExistsError(
            f"{murl} already exists: {config.output} holds a complete shard set. "
            "Pass --overwrite (WriterConfig.overwrite=True) to replace it, or choose another --output."
        )
    try:
        old_names = [s.name for s in read_manifest(config.output, storage_options=config.storage_options).shards]
    except ValueError:
        old_names = []
    # Manifest first: if this rewrite crashes, no manifest may point at a mix of old and new shards.
    fs.rm(mpath)
    for name in old_names:
        _, path = url_to_fs(join_url(config.output, name), config.storage_options)
        if fs.exists(path):
            fs.rm(path)
    log.info("overwriting %s (%d old shards removed)", config.output, len(old_names))


def write_shards(source: Source, config: WriterConfig, *, source_info: Mapping[str, Any] | None = None) -> Manifest:
    """Write all (or ``config.limit``) samples of ``source`` as shards under ``config.output``; return the manifest.

    ``source_info`` is merged into the manifest's ``source`` block (e.g. the input path and split).
    """
    register_fsspec_schemes()
    _prepare_output(config)
    order = np.arange(len(source))
    if config.shuffle_seed is not None:
        order = np.random.default_rng(config.shuffle_seed).permutation(len(source))
    if config.limit is not None:
        order = order[: config.limit]
    if len(order) == 0:
        raise ValueError(f"source {source.kind} has no samples to write")

    max_bytes, max_count = config.max_shard_bytes, config.samples_per_shard
    shards: list[ShardInfo] = []
    keys: set[str] = set()
    current: _OpenShard | None = None
    bar = tqdm(total=len(order), unit="img", desc=f"shards -> {config.output}", disable=not config.progress)
    try:
        for record in _records(source, [int(i) for i in order], config):
            key = record["__key__"]
            if key in keys:
                raise ValueError(f"duplicate sample key {key!r} from source {source.kind}")
            keys.add(key)
            size = _tar_bytes(record)
            if current is not None and (
                (max_count is not None and current.num_samples >= max_count)
                or (max_bytes is not None and current.file_size_with(size) > max_bytes)
            ):
                shards.append(current.close())
                log.info("wrote %s (%d samples)", current.url, current.num_samples)
                current = None
            if current is None:
                name = f"{config.prefix}-{len(shards):06d}.tar"
                current = _OpenShard(join_url(config.output, name), name, config.storage_options)
            current.write(record, size)
            bar.update(1)
        if current is not None:
            shards.append(current.close())
            log.info("wrote %s (%d samples)", current.url, current.num_samples)
            current = None
    finally:
        bar.close()
        if current is not None:  # an error mid-shard: close it so no handle leaks; no manifest follows
            current.close()

    described = source.describe()
    manifest = Manifest(
        shards=shards,
        source={
            "kind": source.kind,
            **dict(source_info or {}),
            **described,
            "image_format": config.image_format,
            "shuffle_seed": config.shuffle_seed,
            "limit": config.limit,
        },
        num_classes=described.get("num_classes"),
        created_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )
    murl = write_manifest(config.output, manifest, storage_options=config.storage_options)
    log.info("wrote %s: %d samples in %d shards", murl, manifest.num_samples, len(shards))
    return manifest
