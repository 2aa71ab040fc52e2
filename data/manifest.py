"""The shard-set manifest: what a writer produced, read back by loaders to plan epochs without listing tars.

``manifest.json`` sits beside the shards and is written last, so its presence means the set is complete. It holds
per shard the name, sample count, byte size and sha256, plus the source description (kind, classes, image size).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from data.storage import (
    MissingShardError,
    RetryPolicy,
    ShardIntegrityError,
    join_url,
    open_url,
    parent_url,
    url_to_fs,
    with_retries,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard of a set."""

    name: str
    """File name relative to the manifest's directory, or the shard's full URL (an index of foreign shards)."""
    num_samples: int
    """Samples (distinct keys) in the shard."""
    num_bytes: int
    """Size of the tar file in bytes."""
    sha256: str
    """Hex sha256 of the whole tar file ("" when an index was built without hashing)."""


@dataclass
class Manifest:
    """A shard set: shards in write order plus a description of where the samples came from."""

    shards: list[ShardInfo]
    """Shards in the order they were written."""
    source: dict[str, Any] = field(default_factory=dict)
    """Source description: kind, input, split, image_size, image_format, classes, ..."""
    num_classes: int | None = None
    """Number of classes of the ``.cls`` labels (None when unknown)."""
    version: int = MANIFEST_VERSION
    """Manifest schema version."""
    created_utc: str = ""
    """ISO time the writer finished."""

    @property
    def num_samples(self) -> int:
        """Total samples over all shards."""
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> str:
        """Serialize to indented JSON (shard list last so the header stays readable)."""
        body = {
            "version": self.version,
            "created_utc": self.created_utc,
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "num_classes": self.num_classes,
            "source": self.source,
            "shards": [asdict(s) for s in self.shards],
        }
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, *, url: str = "<manifest>") -> Manifest:
        """Parse a manifest, with an error naming ``url`` when a field is missing or wrong."""
        try:
            raw = json.loads(text)
            shards = [
                ShardInfo(
                    name=str(s["name"]),
                    num_samples=int(s["num_samples"]),
                    num_bytes=int(s["num_bytes"]),
                    sha256=str(s["sha256"]),
                )
                for s in raw["shards"]
            ]
            version = int(raw.get("version", MANIFEST_VERSION))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{url}: not a valid shard manifest ({type(exc).__name__}: {exc})") from exc
        if version > MANIFEST_VERSION:
            raise ValueError(f"{url}: manifest version {version} is newer than supported ({MANIFEST_VERSION})")
        if "num_samples" in raw and int(raw["num_samples"]) != sum(s.num_samples for s in shards):
            raise ValueError(f"{url}: num_samples does not equal the sum of the shards' sample counts")
        num_classes = raw.get("num_classes")
        return cls(
            shards=shards,
            source=dict(raw.get("source") or {}),
            num_classes=None if num_classes is None else int(num_classes),
            version=version,
            created_utc=str(raw.get("created_utc", "")),
        )


def manifest_url(dataset_url: str) -> str:
    """``dataset_url`` if it already names a ``.json`` file, else ``dataset_url/manifest.json``."""
    return dataset_url if dataset_url.endswith(".json") else join_url(dataset_url, MANIFEST_NAME)


def index_manifest_url(spec: str) -> str:
    """Where the index of manifest-less shards is cached beside them (:mod:`data.index_shards`): a directory's
    ``manifest.json``, or for a brace pattern or one shard a manifest named after the pattern's digest (a subset must
    not pose as the whole directory's manifest)."""
    if "{" not in spec and not spec.endswith(".tar"):
        return manifest_url(spec)
    head = spec.split("{", 1)[0]
    directory = head.rsplit("/", 1)[0] if "/" in head else "."
    return f"{directory}/manifest-index-{hashlib.sha1(spec.encode()).hexdigest()[:12]}.json"


def read_manifest(
    url: str, *, storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None
) -> Manifest:
    """Read the manifest at ``url`` (a manifest file or the shard directory), retrying transient errors."""
    murl = manifest_url(url)

    def _read() -> str:
        with open_url(murl, "rb", storage_options) as f:
            return f.read().decode("utf-8")

    text = with_retries(_read, url=murl, what="reading shard manifest", policy=retry or RetryPolicy())
    return Manifest.from_json(text, url=murl)


def write_manifest(dataset_url: str, manifest: Manifest, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write ``manifest`` to ``dataset_url/manifest.json`` and return its URL."""
    murl = manifest_url(dataset_url)
    with open_url(murl, "wb", storage_options) as f:
        f.write(manifest.to_json().encode("utf-8"))
    return murl


def shard_url(base: str, name: str) -> str:
    """A manifest entry's URL: names are relative to the manifest's directory (our writer), or full URLs (an index of
    shards written elsewhere, :mod:`data.index_shards`)."""
    return name if "://" in name or name.startswith("/") else join_url(base, name)


@dataclass(frozen=True)
class ShardRef:
    """A shard located by URL, with the manifest entry that describes it."""

    url: str
    """Full URL of the tar file."""
    info: ShardInfo
    """The manifest entry (counts, size, hash)."""


@dataclass
class ShardSet:
    """The shards a loader streams, possibly drawn from several manifests, with their combined description."""

    shards: list[ShardRef]
    """Shards in manifest order (the loader's epoch shuffle permutes them)."""
    num_classes: int | None
    """Number of classes (max over the manifests; None if none states it)."""
    sources: list[dict[str, Any]]
    """The ``source`` block of each manifest used."""

    @property
    def num_samples(self) -> int:
        """Total samples over all shards."""
        return sum(s.info.num_samples for s in self.shards)


def resolve_shards(
    source: str | Sequence[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
) -> ShardSet:
    """Build a :class:`ShardSet` from a manifest URL, a shard directory URL, or a list of shard URLs.

    Shard URLs (``.tar``) are looked up in the manifest of their directory, so that sample counts are known
    without reading the tars; several directories (several manifests) may be mixed.
    """
    items = [source] if isinstance(source, str) else list(source)
    if not items:
        raise ValueError("no data source given: pass a manifest URL, a shard directory or a list of shard URLs")
    shards: list[ShardRef] = []
    sources: list[dict[str, Any]] = []
    num_classes: int | None = None
    cache: dict[str, Manifest] = {}
    for item in items:
        if item.endswith(".tar") and "{" not in item:
            base = parent_url(item)
            if base not in cache:
                cache[base] = _read_or_explain(base, manifest_url(base), storage_options, retry)
                sources.append(cache[base].source)
            by_name = {s.name: s for s in cache[base].shards}
            name = item[len(base) + 1 :]
            if name not in by_name:
                raise MissingShardError(f"{item} is not listed in {manifest_url(base)}")
            shards.append(ShardRef(url=item, info=by_name[name]))
            man = cache[base]
        else:
            murl = index_manifest_url(item) if "{" in item else manifest_url(item)
            man = _read_or_explain(item, murl, storage_options, retry)
            base = parent_url(murl)
            sources.append(man.source)
            shards.extend(ShardRef(url=shard_url(base, s.name), info=s) for s in man.shards)
        if man.num_classes is not None:
            num_classes = max(num_classes or 0, man.num_classes)
    if len({s.url for s in shards}) != len(shards):
        raise ValueError("the same shard URL is listed twice in the data source; each shard may appear once")
    return ShardSet(shards=shards, num_classes=num_classes, sources=sources)


def _read_or_explain(
    item: str, murl: str, storage_options: Mapping[str, Any] | None, retry: RetryPolicy | None
) -> Manifest:
    """The manifest at ``murl``; when there is none, an error that says how to index ``item``'s shards."""
    try:
        return read_manifest(murl, storage_options=storage_options, retry=retry)
    except MissingShardError:
        raise MissingShardError(
            f"{item} has no manifest ({murl}): index its shards with `python -m data.index_shards {item}` "
            "(cluster/launch.py does it for data.train_url and data.val_url)"
        ) from None


def check_shards_exist(
    shard_set: ShardSet,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
) -> None:
    """Fail early, naming the URL, if a shard is missing or its size differs from the manifest.

    One directory listing per shard directory (not one request per shard), so it is cheap on object stores.
    """
    policy = retry or RetryPolicy()
    by_dir: dict[str, list[ShardRef]] = {}
    for ref in shard_set.shards:
        by_dir.setdefault(parent_url(ref.url), []).append(ref)
    for directory, refs in by_dir.items():
        fs, path = url_to_fs(directory, storage_options)

        def _list(fs: Any = fs, path: str = path) -> dict[str, int]:
            fs.invalidate_cache(path)  # s3fs caches listings; shards may have been written since
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in fs.ls(path, detail=True)}

        listing = with_retries(_list, url=directory, what="listing shards", policy=policy)
        for ref in refs:
            name = ref.url.rsplit("/", 1)[-1]
            if name not in listing:
                raise MissingShardError(f"shard {ref.url} is listed in the manifest but does not exist")
            if listing[name] != ref.info.num_bytes:
                raise ShardIntegrityError(
                    f"shard {ref.url} has {listing[name]} bytes, the manifest says {ref.info.num_bytes}: "
                    "the shard set changed after it was written; rewrite it with data.write_shards --overwrite"
                )


def verify_shards(
    shard_set: ShardSet,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
) -> None:
    """Read every shard and compare its sha256 with the manifest; raise :class:`ShardIntegrityError` on mismatch."""
    policy = retry or RetryPolicy()
    unhashed = [ref.url for ref in shard_set.shards if not ref.info.sha256]
    if unhashed:
        raise ShardIntegrityError(
            f"{len(unhashed)} shard(s) have no sha256 in their manifest (first: {unhashed[0]}), so they cannot be "
            "verified: index them with python -m data.index_shards --sha256, or do not ask for verification"
        )
    for ref in shard_set.shards:

        def _hash(url: str = ref.url) -> str:
            digest = hashlib.sha256()
            with open_url(url, "rb", storage_options) as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            return digest.hexdigest()

        actual = with_retries(_hash, url=ref.url, what="verifying shard", policy=policy)
        if actual != ref.info.sha256:
            raise ShardIntegrityError(
                f"shard {ref.url}: sha256 {actual} does not match the manifest ({ref.info.sha256}); "
                "the shard is damaged or was replaced: rewrite the set with data.write_shards --overwrite"
            )
        log.debug("verified %s", ref.url)
