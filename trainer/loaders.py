"""The one place that builds a run's loaders: the shard loader (or ``synthetic://N``) with the stage's transform."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data.loader import Decode, SampleTransform, build_loader
from data.manifest import DataSpec
from data.synthetic import SyntheticLoader, parse_synthetic_url
from data.transforms import ImageTransform
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.resilience.preemption import PREEMPTION_SIGNALS
from trainer.run_dir import RunDir


def build_train_loader(
    cfg: TrainConfig,
    env: DistEnv,
    run_dir: Path,
    transform: ImageTransform | None = None,
    sample_transform: SampleTransform | None = None,
    require_labels: bool = True,
    decode: Decode = "pil",
) -> Any:
    """This rank's training loader, seeded from the run seed. ``transform`` maps an image (pretraining,
    classification), ``sample_transform`` a whole sample (detection). ``require_labels=False`` (pretraining)
    serves samples without a ``.cls`` label too; ``decode="tensor"`` hands ``transform`` uint8 tensors (torchvision's
    faster decoders, for v2 transforms). Shards without a manifest are read through their index, beside
    them or in ``run_dir/index`` (the launcher made it)."""
    if not cfg.data.train_url:
        raise ValueError("data.train_url is empty: set it to a shard set (path or s3:// URL) or synthetic://N")
    return _build(
        cfg,
        env,
        run_dir,
        cfg.data.train_url,
        transform,
        sample_transform,
        shuffle=True,
        remainder="drop",
        labels=require_labels,
        decode=decode,
    )


def build_eval_loader(
    cfg: TrainConfig,
    env: DistEnv,
    run_dir: Path,
    transform: ImageTransform | None = None,
    sample_transform: SampleTransform | None = None,
    url: DataSpec | None = None,
    decode: Decode = "pil",
) -> Any:
    """This rank's slice of ``data.val_url`` in a fixed order. Every sample is served once over all ranks; the
    slots that pad the last batches carry the label :data:`data.loader.IGNORE_LABEL` (``None`` targets with a
    ``sample_transform``) and must not be counted. ``url`` reads another labeled set the same way (a kNN bank)."""
    url = url or cfg.data.val_url
    if not url:
        raise ValueError("data.val_url is empty: set it to the validation shard set (path or s3:// URL)")
    return _build(
        cfg, env, run_dir, url, transform, sample_transform, shuffle=False, remainder="pad", labels=True, decode=decode
    )


def _build(
    cfg: TrainConfig,
    env: DistEnv,
    run_dir: Path,
    url: DataSpec,
    transform: ImageTransform | None,
    sample_transform: SampleTransform | None,
    shuffle: bool,
    remainder: str,
    labels: bool,
    decode: Decode = "pil",
) -> Any:
    synthetic = parse_synthetic_url(url) if isinstance(url, str) else None
    if synthetic is not None:
        if sample_transform is not None:
            raise ValueError(
                f"{url}: synthetic data has no detection targets; point the detection stage at COCO shards"
            )
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
        transform=transform,
        sample_transform=sample_transform,
        shuffle=shuffle,
        remainder=remainder,
        require_labels=labels,
        decode=decode,
        label_field=cfg.data.label_field,
        shuffle_window=cfg.data.shuffle_window,
        index_dir=str(RunDir(run_dir).index),
        pin_memory=env.device.type == "cuda",
        worker_ignored_signals=PREEMPTION_SIGNALS,
    )
