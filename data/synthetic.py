"""Synthetic image batches (``synthetic://N``): no I/O, for benchmarks and for tests of the training engine.

Sample ``i`` of epoch ``e`` is a smooth random image drawn from ``(seed, e, i)``. Unlike the shard loader (which
gives each rank a contiguous slice of the epoch to read fewer bytes), rank ``r`` takes global batch slot ``r`` of
every step: the union over ranks of step ``t`` is samples ``[t*W*B, (t+1)*W*B)`` for every world size ``W``, so
runs on different world sizes with the same global batch see the same samples at every step.

Resume on another layout (world size or per-rank batch): the new run starts at the first global step boundary at
or after the samples already consumed, so no sample of the epoch is seen twice and fewer than one new global batch
(``world_size * batch_size - 1`` samples) is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from data.batch import Batch, LoaderStats
from data.sampling import derive_seed

SCHEME = "synthetic://"
TAG_SYNTHETIC = 11


def parse_synthetic_url(url: str) -> int | None:
    """Samples per epoch of a ``synthetic://N`` URL, or None for any other URL."""
    if not url.startswith(SCHEME):
        return None
    text = url[len(SCHEME) :]
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{url!r}: write synthetic://N with N the number of samples per epoch (e.g. synthetic://4096)")
    return int(text)


def synthetic_image(seed: int, epoch: int, index: int, size: int) -> torch.Tensor:
    """A deterministic ``(3, size, size)`` image with structure at several scales (normalized-pixel range)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, TAG_SYNTHETIC, epoch, index))
    coarse = torch.randn(1, 3, 4, 4, generator=gen)
    fine = torch.randn(1, 3, size // 4, size // 4, generator=gen) * 0.3
    img = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    img = img + F.interpolate(fine, size=size, mode="nearest")
    return img[0]


class SyntheticLoader:
    """A :class:`data.batch.Loader` of generated images (the fields of a :class:`data.loader.LoaderConfig` it uses:
    batch size, rank, world size, seed)."""

    def __init__(
        self, num_samples: int, *, batch_size: int, image_size: int, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(f"synthetic://{num_samples} cannot give one batch of {batch_size} to {world_size} ranks")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.image_size = image_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.stats = LoaderStats()
        self._position = 0

    @property
    def source_names(self) -> list[str]:
        """No mixture."""
        return []

    @property
    def source_samples(self) -> list[int]:
        """No mixture."""
        return []

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch starts at its beginning."""
        if epoch != self.epoch:
            self.epoch, self._position = epoch, 0

    def skip(self, batches: int) -> None:
        """Pass over the next ``batches`` batches (a rollback's skipped samples), into later epochs if needed."""
        position = self._position + batches
        self.epoch, self._position = self.epoch + position // len(self), position % len(self)

    def __iter__(self) -> Iterator[Batch]:
        while self._position < len(self):
            first = (self._position * self.world_size + self.rank) * self.batch_size
            indices = range(first, first + self.batch_size)
            images = torch.stack([synthetic_image(self.seed, self.epoch, i, self.image_size) for i in indices])
            keys = [f"synthetic-{self.epoch}-{i}" for i in indices]
            self._position += 1
            yield Batch(images, torch.tensor([i % 10 for i in indices]), keys, self.epoch, [0] * len(keys))
        self.epoch, self._position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position (batches consumed in the epoch)."""
        return {
            "epoch": self.epoch,
            "position": self._position,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the samples already consumed; on another layout, at the next new global batch boundary."""
        consumed = int(state["position"]) * int(state["world_size"]) * int(state["batch_size"])
        global_batch = self.world_size * self.batch_size
        self.epoch, self._position = int(state["epoch"]), -(-consumed // global_batch)
