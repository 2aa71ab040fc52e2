"""Data that makes a loss spike: calm low-contrast images, a shard of salt-and-pepper noise, and a run seed whose
shard order serves the noise where a test needs it (the loss-spike rollback tests)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image

from data.sampling import EpochOrder

SHARD = 8  # samples per shard = the batch size: a bad shard fills exactly one batch of one rank


def write_shard(path: Path, prefix: str, images: list[np.ndarray]) -> list[str]:
    """A tar shard in webdataset's layout (``.png`` + ``.cls``), written without our writer."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, pixels in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(pixels).save(buf, format="PNG")
            key = f"{prefix}{i:03d}"
            for name, data in ((f"{key}.png", buf.getvalue()), (f"{key}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            keys.append(key)
    return keys


def calm(seed: int) -> np.ndarray:
    """A low-contrast image near ImageNet's mean colour: smooth shapes of +-20 levels, what the run learns on."""
    rng = np.random.default_rng(seed)
    coarse = PIL.Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 64), PIL.Image.BICUBIC)
    mean = np.array([124, 116, 104], dtype=np.float32)
    return (mean + (np.asarray(coarse, dtype=np.float32) - 128) * 20 / 128).clip(0, 255).astype(np.uint8)


def noise(seed: int) -> np.ndarray:
    """Salt and pepper: every pixel black or white, another distribution entirely."""
    return ((np.random.default_rng(seed).random((64, 64, 3)) < 0.5) * 255).astype(np.uint8)


def seed_hitting_noise_once(num_shards: int, bad: int, first_step: int = 6, last_step: int = 9) -> tuple[int, int]:
    """A run seed whose epoch 0 serves shard ``bad`` at a step in ``first_step..last_step`` (after the spike
    statistic's warm-up and a checkpoint) and whose epoch 1 does not serve it in the steps a rollback borrows from
    it. The loader's own
    shard order decides (2 ranks x 1 shard per step: rank 0 serves order positions 0..9, rank 1 10..19)."""
    steps = num_shards // 2
    for seed in range(200):
        first = int(np.flatnonzero(EpochOrder([SHARD] * num_shards, seed, 0, True).shard_order == bad)[0])
        second = int(np.flatnonzero(EpochOrder([SHARD] * num_shards, seed, 1, True).shard_order == bad)[0])
        if first_step <= first % steps + 1 <= last_step and second % steps >= 3:
            return seed, first % steps + 1
    raise AssertionError("no seed places the bad shard where the test needs it")
