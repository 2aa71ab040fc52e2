"""What a run reads, as MLflow dataset inputs: which data, and which version of it, trained a model.

Every shard set of the config is one input: the training set (each source of a mixture with its weight), the
validation set and the kNN probe's bank; a transfer stage's upstream export (``model.pretrained``) is one more. Each
carries its URL with credentials redacted, a digest and a profile (samples, shards, classes, weight):

- a shard set's digest is the sha256 of its manifest (ours, or the index the launcher made for foreign shards),
  which lists every shard's size and sha256, so a changed shard changes the digest;
- an export's digest is the sha256 of its bytes (read once, at the run's first start);
- ``synthetic://N`` is digested by its URL.

Rank 0 logs them once, at the run's first start (:meth:`trainer.observability.tracking.Tracker.start_run`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from data.manifest import Manifest, data_specs, find_manifest, source_label
from data.storage import open_url
from data.synthetic import parse_synthetic_url
from trainer.config import TrainConfig
from trainer.observability.tracking import redact
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)

DIGEST_CHARS = 16
"""Hex characters of a digest shown in MLflow (64 bits: enough to tell versions of one set apart)."""


@dataclass(frozen=True)
class RunInput:
    """One thing a run reads, as MLflow records it."""

    name: str
    """A short name: the set's last path component (``train``, ``fashion-mnist-64``) or ``upstream-export``."""
    context: str
    """``training``, ``validation``, ``knn_bank`` or ``upstream``; a set read in two roles names both, joined by
    a comma."""
    url: str
    """Where it is read from, credentials redacted."""
    source_type: str
    """``local``, ``s3``, ``http``, ``synthetic`` or another fsspec protocol."""
    digest: str
    profile: dict[str, Any] = field(default_factory=dict)
    """Samples, shards and classes of a shard set, a mixture source's weight, an export's size."""


def run_inputs(cfg: TrainConfig, run_dir: Path) -> list[RunInput]:
    """The inputs of ``cfg``'s run in ``run_dir``, in the order training meets them."""
    index_dir = str(RunDir(run_dir).index)
    train = cfg.data.train_url
    weights = dict(train) if isinstance(train, dict) else {}
    inputs = [_shard_set(url, "training", index_dir, weights.get(url)) for url in data_specs(train)]
    if cfg.data.val_url:
        inputs += [_shard_set(url, "validation", index_dir) for url in data_specs(cfg.data.val_url)]
    bank = getattr(cfg.eval, "knn_bank_url", None)
    if bank:
        inputs += [_shard_set(url, "knn_bank", index_dir) for url in data_specs(bank)]
    upstream = getattr(cfg.model, "pretrained", None)
    if upstream:
        inputs.append(_export(upstream, "upstream-export", "upstream"))
    init_from = getattr(cfg.model, "init_from", None)
    if init_from:  # digested as loaded: the conversion the launcher stored in the run directory
        from trainer.stages.continuation import WEIGHTS_FILE

        inputs.append(_export(str(RunDir(run_dir).init / WEIGHTS_FILE), "init-from-weights", "init_from", init_from))
    return _merge_roles(inputs)


def _merge_roles(inputs: list[RunInput]) -> list[RunInput]:
    """One input per set: a set read in two roles (the training set as the kNN bank) carries both contexts
    (``training,knn_bank``); MLflow keeps one input per dataset and would drop the second role."""
    merged: dict[str, RunInput] = {}
    for item in inputs:
        seen = merged.get(item.url)
        merged[item.url] = item if seen is None else replace(seen, context=f"{seen.context},{item.context}")
    return list(merged.values())


def _source_type(url: str) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    return {"file": "local", "https": "http"}.get(scheme, scheme)


def _shard_set(url: str, context: str, index_dir: str, weight: float | None = None) -> RunInput:
    profile: dict[str, Any] = {} if weight is None else {"weight": weight}
    samples = parse_synthetic_url(url)
    if samples is not None:
        digest = hashlib.sha256(url.encode()).hexdigest()[:DIGEST_CHARS]
        return RunInput("synthetic", context, url, "synthetic", digest, {"samples": samples, **profile})
    manifest_at = find_manifest(url, index_dir)
    if manifest_at is None:  # the launcher indexes every set before the ranks start: only an odd layout gets here
        log.warning("no manifest or index found for %s: its MLflow input has no digest", redact("url", url))
        digest = "unindexed"
    else:
        with open_url(manifest_at) as f:
            raw = f.read()
        digest = hashlib.sha256(raw).hexdigest()[:DIGEST_CHARS]
        manifest = Manifest.from_json(raw.decode("utf-8"), url=manifest_at)
        profile = {"samples": manifest.num_samples, "shards": len(manifest.shards), **profile}
        if manifest.num_classes is not None:
            profile["classes"] = manifest.num_classes
    return RunInput(source_label(url), context, redact("url", url), _source_type(url), digest, profile)


def _export(url: str, name: str, context: str, shown: str | None = None) -> RunInput:
    """Weights a run starts from, digested from ``url``, their location shown as ``shown`` (default ``url``)."""
    sha, size = hashlib.sha256(), 0
    with open_url(url) as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    profile = {"bytes": size}
    shown = shown or url
    digest = sha.hexdigest()[:DIGEST_CHARS]
    return RunInput(name, context, redact("url", shown), _source_type(shown), digest, profile)


def as_mlflow(inputs: list[RunInput]) -> list[Any]:
    """The inputs as MLflow ``DatasetInput`` entities (the dataset's context as MLflow's own input tag)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return [
        DatasetInput(
            Dataset(
                name=item.name,
                digest=item.digest,
                source_type=item.source_type,
                source=json.dumps({"url": item.url}),
                profile=json.dumps(item.profile),
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, item.context)],
        )
        for item in inputs
    ]
