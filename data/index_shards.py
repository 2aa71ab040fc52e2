"""Index WebDataset shards that have no manifest: sample keys and counts per shard, read from tar headers only.

Shard sets people already have (ImageNet-1k as ``imagenet1k-train-{0000..1023}.tar``, img2dataset output, shards of
``webdataset.ShardWriter``) come without our ``manifest.json``. A loader needs one to plan an epoch (equal batches
per rank, exact resume), so this module builds it: every shard is scanned in parallel, member headers only (the
data blocks are skipped by seeking), and sample keys follow webdataset's rule (the member path up to the first dot
of its file name; extensions in any case). The result is an ordinary :class:`data.manifest.Manifest` whose shard
names are full URLs, cached wherever it can be written.

    python -m data.index_shards 's3://bucket/in1k/imagenet1k-train-{0000..1023}.tar' [--output URL] [--sha256]
    python -m data.index_shards /data/my-shards/            # a directory of .tar files
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import sys
import tarfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from braceexpand import braceexpand

from data.manifest import (
    MANIFEST_NAME,
    DataSpec,
    Manifest,
    ShardInfo,
    data_specs,
    find_manifest,
    index_candidates,
    manifest_url,
    write_manifest,
)
from data.storage import RetryPolicy, open_url, parent_url, url_to_fs, with_retries

log = logging.getLogger(__name__)

INDEX_KIND = "indexed"


def expand_source(spec: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The tar URLs a source names: a brace pattern (``train-{0000..0099}.tar``), one ``.tar``, or a directory (every
    ``.tar`` in it, sorted). Raises ``FileNotFoundError`` naming the URL when nothing matches."""
    if "{" in spec:
        urls = list(braceexpand(spec))
        if not all(u.endswith(".tar") for u in urls):
            raise ValueError(f"{spec}: a brace pattern must name .tar files")
        return urls
    if spec.endswith(".tar"):
        return [spec]
    fs, path = url_to_fs(spec, storage_options)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{spec}: no such shard directory")
    names = sorted(p for p in fs.ls(path, detail=False) if str(p).endswith(".tar"))
    if not names:
        raise FileNotFoundError(f"{spec}: the directory holds no .tar shards and no {MANIFEST_NAME}")
    base = spec.rstrip("/")
    return [f"{base}/{str(name).rstrip('/').rsplit('/', 1)[-1]}" for name in names]


def index_shard(
    url: str, *, sha256: bool = False, storage_options: Mapping[str, Any] | None = None
) -> tuple[ShardInfo, list[str]]:
    """One shard's manifest entry (name = its URL) and the extensions its samples use, from the tar headers."""
    from webdataset.tariterators import base_plus_ext  # here: webdataset's package imports torch, the launcher not

    fs, path = url_to_fs(url, storage_options)
    num_bytes = int(fs.size(path))
    keys = 0
    last_key: str | None = None
    extensions: set[str] = set()
    with open_url(url, "rb", storage_options) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:  # TarFile.next() seeks past each member's data: only headers are read
            if not member.isfile():
                continue
            key, ext = base_plus_ext(member.name)
            if key is None or key.startswith("__"):
                continue  # webdataset skips members without an extension and __-prefixed metadata
            if key != last_key:  # webdataset groups consecutive members with one key into a sample
                keys += 1
                last_key = key
            extensions.add(str(ext).lower())
    digest = ""
    if sha256:
        hasher = hashlib.sha256()
        with open_url(url, "rb", storage_options) as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        digest = hasher.hexdigest()
    return ShardInfo(name=url, num_samples=keys, num_bytes=num_bytes, sha256=digest), sorted(extensions)


def index_shards(
    urls: Sequence[str],
    *,
    workers: int = 16,
    sha256: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    source: str = "",
    progress: bool = True,
) -> Manifest:
    """Index ``urls`` in parallel (threads: the work is I/O) into a manifest in their order; logs progress."""
    if not urls:
        raise ValueError("no shards to index")
    policy = retry or RetryPolicy()
    done = 0
    started = time.monotonic()

    def one(url: str) -> tuple[ShardInfo, list[str]]:
        nonlocal done
        result = with_retries(
            lambda: index_shard(url, sha256=sha256, storage_options=storage_options),
            url=url,
            what="indexing shard",
            policy=policy,
        )
        done += 1
        if progress and (done == len(urls) or done % max(1, len(urls) // 20) == 0):
            log.info("indexed %d/%d shards (%.0fs)", done, len(urls), time.monotonic() - started)
        return result

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(urls)))) as pool:
        results = list(pool.map(one, urls))
    empty = [info.name for info, _ in results if info.num_samples == 0]
    if empty:
        raise ValueError(f"{len(empty)} shard(s) hold no samples (first: {empty[0]}): not WebDataset tar shards?")
    extensions = sorted({ext for _, exts in results for ext in exts})
    return Manifest(
        shards=[info for info, _ in results],
        source={"kind": INDEX_KIND, "input": source or urls[0], "extensions": extensions, "sha256": sha256},
        num_classes=None,
        created_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def build_index(
    spec: str,
    *,
    output: str | None = None,
    fallback_dir: str | None = None,
    workers: int = 16,
    sha256: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Index ``spec`` and write the manifest: to ``output`` when given, else beside the shards, else (not writable)
    into ``fallback_dir`` (where :func:`data.manifest.find_manifest` looks for it). Returns the manifest's URL."""
    urls = expand_source(spec, storage_options)
    log.info("indexing %d shard(s) of %s (no manifest)", len(urls), spec)
    manifest = index_shards(urls, workers=workers, sha256=sha256, storage_options=storage_options, source=spec)
    targets = [output] if output else index_candidates(spec, fallback_dir)
    for target in targets:
        try:
            url = write_manifest(target, manifest, storage_options=storage_options)
        except (OSError, NotImplementedError) as exc:  # read-only storage (an https:// mirror) raises the latter
            log.warning("cannot write the index to %s (%s: %s)", target, type(exc).__name__, exc)
            continue
        log.info("index of %d shards, %d samples written to %s", len(manifest.shards), manifest.num_samples, url)
        return url
    raise OSError(f"could not write the index of {spec} to {' or '.join(targets)}: pass a writable --output")


def ensure_indexes(
    source: DataSpec, fallback_dir: str, *, workers: int = 16, storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Index every part of a data spec (one URL, a list, a mixture) whose shards have no manifest yet (none of their
    own, no cached index); returns the manifests written. Shard sets with a manifest, single shards listed in their
    directory's manifest, and ``synthetic://`` need nothing."""
    written = []
    has_manifest: dict[str, bool] = {}  # directory -> holds a manifest (looked up once for all its shards)
    for spec in data_specs(source):
        if spec.startswith("synthetic://"):
            continue
        if spec.endswith(".tar") and "{" not in spec:
            directory = parent_url(spec)
            if directory not in has_manifest:
                fs, path = url_to_fs(manifest_url(directory), storage_options)
                has_manifest[directory] = bool(fs.exists(path))
            if has_manifest[directory]:
                continue  # listed in its directory's manifest (resolve_shards names it if it is not)
        if find_manifest(spec, fallback_dir, storage_options) is None:
            written.append(
                build_index(spec, fallback_dir=fallback_dir, workers=workers, storage_options=storage_options)
            )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="brace pattern, .tar URL or directory of .tar shards (path, file://, s3://)")
    parser.add_argument("--output", help="manifest URL to write (default: beside the shards)")
    parser.add_argument("--workers", type=int, default=16, help="shards scanned in parallel")
    parser.add_argument("--sha256", action="store_true", help="also hash every shard (reads all bytes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        url = build_index(args.source, output=args.output, workers=args.workers, sha256=args.sha256)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
