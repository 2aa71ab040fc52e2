"""What a loader hands the trainer: a typed :class:`Batch`, and the :class:`Loader` protocol stages program against.

Everything a step needs about its samples travels with the batch (the keys that draw masks and fill the sample
ledger, the epoch they belong to, the mixture source of each), so nothing reads it back from the loader afterwards.
:class:`data.loader.ShardLoader` and :class:`data.synthetic.SyntheticLoader` satisfy :class:`Loader`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch

Labels = torch.Tensor | list[Any]
"""Class labels (a long tensor; padded slots hold ``IGNORE_LABEL``), or per-image targets for detection (``None``
for a padded slot)."""


@dataclass
class Batch:
    """One batch of one rank."""

    images: torch.Tensor
    """``(N, 3, H, W)`` float images, transformed."""
    labels: Labels
    keys: list[str]
    """Each sample's key (unique in its shard set)."""
    epoch: int
    """The epoch the samples were drawn for (masks and augmentation derive from it)."""
    sources: list[int]
    """Each sample's mixture source (all 0 without a mixture)."""

    def to(self, device: torch.device) -> Batch:
        """The batch with its images on ``device`` (labels and targets are moved by the stage that uses them)."""
        return Batch(self.images.to(device, non_blocking=True), self.labels, self.keys, self.epoch, self.sources)


@dataclass
class LoaderStats:
    """Counters of one rank's loader, accumulated over workers and epochs (and carried in the state)."""

    samples: int = 0
    """Samples served in batches (including replacements)."""
    decoded: int = 0
    """Decode attempts (served samples, skipped ones, and the search for a replacement); skipping to a resume
    position decodes nothing."""
    bad_image: int = 0
    """Samples skipped because the image bytes did not decode."""
    bad_label: int = 0
    """Samples skipped because ``.cls`` was not an integer label in range (or, with a sample transform, ``.json``
    was missing or not a JSON object)."""
    truncated: int = 0
    """Samples the manifest lists but the tar did not deliver (truncated or damaged shard)."""
    replaced: int = 0
    """Slots filled with a replacement because their sample was skipped."""
    retries: int = 0
    """Transient read errors that were retried."""

    @property
    def skipped(self) -> int:
        """All skipped samples."""
        return self.bad_image + self.bad_label + self.truncated

    def add(self, other: Mapping[str, int]) -> None:
        """Add counters from a dict (a worker's per-batch delta)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + int(other.get(f.name, 0)))

    def as_dict(self) -> dict[str, int]:
        """Counters as a plain dict."""
        return asdict(self)


class Loader(Protocol):
    """A resumable loader of one rank: the same number of batches per epoch on every rank."""

    epoch: int
    """The epoch the next batch belongs to."""
    stats: LoaderStats
    """Skipped and replaced samples, retries (this rank)."""

    @property
    def source_names(self) -> list[str]:
        """The mixture's sources in order (empty without a mixture)."""

    @property
    def source_samples(self) -> list[int]:
        """Samples this rank served from each mixture source since the run began."""

    def __len__(self) -> int:
        """Batches per epoch."""

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch; iterated to its end, the loader moves on to the next epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate (another epoch than the current one starts at its beginning)."""

    def skip(self, batches: int) -> None:
        """Pass over the next ``batches`` batches without reading them."""

    def state_dict(self) -> dict[str, Any]:
        """The position, for checkpoints."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
