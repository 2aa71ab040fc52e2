"""The training stream of a run: the shard loader (or ``synthetic://N``) with the stage's transform."""

from __future__ import annotations

from typing import Any

from data.loader import build_loader
from data.synthetic import SyntheticLoader, parse_synthetic_url
from data.transforms import pretrain_transform
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.preemption import PREEMPTION_SIGNALS


def build_train_loader(cfg: TrainConfig, env: DistEnv) -> Any:
    """This rank's pretraining loader: RandomResizedCrop + flip + normalize, seeded from the run seed."""
    url = cfg.data.train_url
    if not url:
        raise ValueError("data.train_url is empty: set it to a shard set (path or s3:// URL) or synthetic://N")
    synthetic = parse_synthetic_url(url)
    if synthetic is not None:
        return SyntheticLoader(
            synthetic,
            batch_size=cfg.data.batch_size,
            image_size=cfg.data.image_size,
            rank=env.rank,
            world_size=env.world_size,
            seed=cfg.seed,
        )
    return build_loader(
        url,
        batch_size=cfg.data.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        transform=pretrain_transform(cfg.data.image_size, scale=(cfg.data.min_scale, 1.0)),
        pin_memory=env.device.type == "cuda",
        worker_ignored_signals=PREEMPTION_SIGNALS,
    )
