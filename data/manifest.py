"""The shard-set manifest: what a writer produced, read back by loaders to plan epochs without listing tars.

``manifest.json`` sits beside the shards and is written last, so its presence means the set is complete. It holds
per shard the name, sample count, byte size and sha256, plus the source description (kind, classes, image size).
"""

from __future__ import annotations

import functools
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
    source: int = 0
    """Index of the mixture source the shard belongs to (0 without a mixture)."""


@dataclass(frozen=True)
class MixSource:
    """One source of a weighted mixture (``data.train_url: {url: weight, ...}``)."""

    name: str
    """Short label for logs and metric names (from the URL's last path component)."""
    spec: str
    """The source as configured: a shard directory, manifest, brace pattern or ``.tar`` URL."""
    weight: float
    """Relative share of the source in every epoch (normalized over the sources)."""


@dataclass
class ShardSet:
    """The shards a loader streams, possibly drawn from several manifests, with their combined description."""

    shards: list[ShardRef]
    """Shards in manifest order (the loader's epoch shuffle permutes them)."""
    num_classes: int | None
    """Number of classes (max over the manifests; None if none states it)."""
    descriptions: list[dict[str, Any]]
    """The ``source`` block of each manifest used."""
    mixture: list[MixSource] | None = None
    """Weighted sources (each shard's ``source`` indexes it); None: one set, samples in their natural proportions."""

    @property
    def num_samples(self) -> int:
        """Total samples over all shards."""
        return sum(s.info.num_samples for s in self.shards)

    def source_sizes(self) -> list[int]:
        """Samples per mixture source (one entry without a mixture)."""
        sizes = [0] * (len(self.mixture) if self.mixture else 1)
        for ref in self.shards:
            sizes[ref.source] += ref.info.num_samples
        return sizes


DataSpec = str | Sequence[str] | Mapping[str, float]
"""What ``data.train_url`` may hold: one shard set, a list of them (one set, their union), or a weighted mixture
``{url: weight}`` whose sources keep their weights whatever their sizes."""


def data_specs(source: DataSpec) -> list[str]:
    """The individual URLs/patterns of a data spec, in order."""
    return [source] if isinstance(source, str) else list(source)


def index_candidates(spec: str, index_dir: str | None = None) -> list[str]:
    """Where the manifest of ``spec``'s shards may be, in the order it is looked for: a shard directory's own
    ``manifest.json`` (written by our writer or by indexing), the index cached beside a pattern's shards
    (:func:`index_manifest_url`), and the copy in ``index_dir`` (a run's ``index/``) when the shards' location was
    not writable."""
    if spec.endswith(".json"):
        return [spec]
    own = manifest_url(spec) if "{" not in spec and not spec.endswith(".tar") else index_manifest_url(spec)
    if index_dir is None:
        return [own]
    return [own, f"{index_dir.rstrip('/')}/manifest-index-{hashlib.sha1(spec.encode()).hexdigest()[:12]}.json"]


def find_manifest(
    spec: str,
    index_dir: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
) -> str | None:
    """The first of :func:`index_candidates` that exists, or None."""
    for url in index_candidates(spec, index_dir):
        fs, path = url_to_fs(url, storage_options)
        exists = functools.partial(fs.exists, path)
        if with_retries(exists, url=url, what="looking for the manifest", policy=retry or RetryPolicy()):
            return url
    return None


def source_label(spec: str) -> str:
    """A short name for a source in logs and metric names: its last path component without a pattern or suffix."""
    tail = spec.rstrip("/").rsplit("/", 1)[-1].split("{", 1)[0].removesuffix(".tar").removesuffix(".json")
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in tail).strip("-_.")
    if tail in ("", "manifest"):
        parent = spec.rstrip("/").rsplit("/", 2)
        tail = source_label("/".join(parent[:-1])) if len(parent) > 1 else "source"
    return tail or "source"


def resolve_shards(
    source: DataSpec,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy | None = None,
    index_dir: str | None = None,
) -> ShardSet:
    """Build a :class:`ShardSet` from a manifest URL, a shard directory URL, a brace pattern, a list of those or of
    shard URLs (their union), or a weighted mixture ``{spec: weight}``.

    Shard URLs (``.tar``) are looked up in the manifest of their directory, so that sample counts are known
    without reading the tars; several directories (several manifests) may be mixed. Shards without a manifest of
    their own are found through their index (:func:`index_candidates`, ``index_dir`` included).
    """
    if isinstance(source, Mapping):
        return _resolve_mixture(source, storage_options, retry, index_dir)
    items = data_specs(source)
    if not items:
        raise ValueError("no data source given: pass a manifest URL, a shard directory or a list of shard URLs")
    shards: list[ShardRef] = []
    descriptions: list[dict[str, Any]] = []
    num_classes: int | None = None
    cache: dict[str, _Listing] = {}
    for item in items:
        listed = (
            _listed_shard(item, cache, storage_options, retry) if item.endswith(".tar") and "{" not in item else None
        )
        if listed is not None:  # a shard of a set with a manifest: its entry there
            man, entry = listed
            shards.append(ShardRef(url=item, info=entry))
            if man.source not in descriptions:
                descriptions.append(man.source)
        else:
            candidates = index_candidates(item, index_dir)
            murl = candidates[0]
            if len(candidates) > 1:  # the shards' own manifest, else a run's copy of their index
                murl = find_manifest(item, index_dir, storage_options, retry) or murl
            man = _read_or_explain(item, murl, storage_options, retry)
            base = parent_url(murl)
            descriptions.append(man.source)
            shards.extend(ShardRef(url=shard_url(base, s.name), info=s) for s in man.shards)
        if man.num_classes is not None:
            num_classes = max(num_classes or 0, man.num_classes)
    if len({s.url for s in shards}) != len(shards):
        raise ValueError("the same shard URL is listed twice in the data source; each shard may appear once")
    return ShardSet(shards=shards, num_classes=num_classes, descriptions=descriptions)


_Listing = tuple[Manifest, dict[str, ShardInfo]] | None
"""A directory's manifest and its entries by shard name (None: the directory has no manifest)."""


def _listed_shard(
    item: str, cache: dict[str, _Listing], storage_options: Mapping[str, Any] | None, retry: RetryPolicy | None
) -> tuple[Manifest, ShardInfo] | None:
    """The manifest of ``item``'s directory and its entry there; None when the directory has no manifest (the shard
    is then read through its own index). Each directory's manifest is read and indexed once per ``cache``."""
    base = parent_url(item)
    if base not in cache:
        try:
            man = read_manifest(base, storage_options=storage_options, retry=retry)
            cache[base] = (man, {s.name: s for s in man.shards})
        except MissingShardError:
            cache[base] = None
    listing = cache[base]
    if listing is None:
        return None
    man, by_name = listing
    name = item[len(base) + 1 :]
    if name not in by_name:
        raise MissingShardError(f"{item} is not listed in {manifest_url(base)}")
    return man, by_name[name]


def _resolve_mixture(
    weights: Mapping[str, float],
    storage_options: Mapping[str, Any] | None,
    retry: RetryPolicy | None,
    index_dir: str | None,
) -> ShardSet:
    if not weights:
        raise ValueError("an empty mixture: name at least one {url: weight}")
    bad = {spec: w for spec, w in weights.items() if not isinstance(w, int | float) or not w > 0}
    if bad:
        raise ValueError(f"mixture weights must be positive numbers, got {bad}")
    parts = [
        resolve_shards(spec, storage_options=storage_options, retry=retry, index_dir=index_dir) for spec in weights
    ]
    names = [source_label(spec) for spec in weights]
    names = [n if names.count(n) == 1 else f"{i}_{n}" for i, n in enumerate(names)]
    shards = [ShardRef(url=ref.url, info=ref.info, source=i) for i, part in enumerate(parts) for ref in part.shards]
    if len({s.url for s in shards}) != len(shards):
        raise ValueError("two sources of the mixture share a shard; each shard may belong to one source")
    classes = [p.num_classes for p in parts if p.num_classes is not None]
    return ShardSet(
        shards=shards,
        num_classes=max(classes) if classes else None,
        descriptions=[d for p in parts for d in p.descriptions],
        mixture=[MixSource(n, spec, float(w)) for n, spec, w in zip(names, weights, weights.values(), strict=True)],
    )


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

        def _list(fs: Any = fs, path: str = path) -> dict[str, int | None]:
            fs.invalidate_cache(path)  # s3fs caches listings; shards may have been written since
            return {  # an HTTP index page lists names without sizes
                e["name"].rstrip("/").rsplit("/", 1)[-1]: None if e.get("size") is None else int(e["size"])
                for e in fs.ls(path, detail=True)
            }

        listing = with_retries(_list, url=directory, what="listing shards", policy=policy)
        for ref in refs:
            name = ref.url.rsplit("/", 1)[-1]
            if name not in listing:
                raise MissingShardError(f"shard {ref.url} is listed in the manifest but does not exist")
            if listing[name] is not None and listing[name] != ref.info.num_bytes:
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
