"""The one place that builds a run's loaders: the run's config becomes one :class:`data.loader.LoaderConfig`, which
travels unchanged to the worker streams; ``synthetic://N`` gives a :class:`data.synthetic.SyntheticLoader`."""

from __future__ import annotations

from pathlib import Path

from data.batch import Loader
from data.loader import Decode, LoaderConfig, Remainder, SampleTransform, build_loader
from data.manifest import DataSpec
from data.synthetic import SyntheticLoader, parse_synthetic_url
from data.transforms import ImageTransform
from trainer.config import TrainConfig
from trainer.distributed import DistEnv
from trainer.resilience.preemption import PREEMPTION_SIGNALS
from trainer.run_dir import RunDir


def loader_config(
    cfg: TrainConfig,
    env: DistEnv,
    *,
    shuffle: bool,
    remainder: Remainder,
    require_labels: bool,
    decode: Decode,
    train: bool = False,
) -> LoaderConfig:
    """This rank's loader settings from the run's config (the only mapping of ``data.*`` onto the loader). A
    training loader serves whole optimizer steps of the canonical layout (:meth:`TrainConfig.canonical_layout`)."""
    return LoaderConfig(
        batch_size=cfg.data.batch_size,
        rank=env.rank,
        world_size=env.world_size,
        grad_accum=cfg.deepspeed.grad_accum if train else 1,
        canonical=cfg.canonical_layout() if train else None,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        shuffle=shuffle,
        shuffle_window=cfg.data.shuffle_window,
        remainder=remainder,
        label_field=cfg.data.label_field,
        decode=decode,
        require_labels=require_labels,
        pin_memory=env.device.type == "cuda",
        worker_ignored_signals=PREEMPTION_SIGNALS,
    )


def build_train_loader(
    cfg: TrainConfig,
    env: DistEnv,
    run_dir: Path,
    transform: ImageTransform | None = None,
    sample_transform: SampleTransform | None = None,
    require_labels: bool = True,
    decode: Decode = "pil",
) -> Loader:
    """This rank's training loader, seeded from the run seed. ``transform`` maps an image (pretraining,
    classification), ``sample_transform`` a whole sample (detection). ``require_labels=False`` (pretraining)
    serves samples without a ``.cls`` label too; ``decode="tensor"`` hands ``transform`` uint8 tensors (torchvision's
    faster decoders, for v2 transforms). Shards without a manifest are read through their index, beside
    them or in the run directory's ``index/`` (the launcher made it)."""
    config = loader_config(
        cfg, env, shuffle=True, remainder="drop", require_labels=require_labels, decode=decode, train=True
    )
    return _build(cfg, run_dir, cfg.data.train_url, config, transform, sample_transform)


def build_eval_loader(
    cfg: TrainConfig,
    env: DistEnv,
    run_dir: Path,
    transform: ImageTransform | None = None,
    sample_transform: SampleTransform | None = None,
    url: DataSpec | None = None,
    decode: Decode = "pil",
) -> Loader:
    """This rank's slice of ``data.val_url`` in a fixed order. Every sample is served once over all ranks; the
    slots that pad the last batches carry the label :data:`data.loader.IGNORE_LABEL` (``None`` targets with a
    ``sample_transform``) and must not be counted. ``url`` reads another labeled set the same way (a kNN bank)."""
    url = url or cfg.data.val_url
    if not url:
        raise ValueError("data.val_url is empty: set it to the validation shard set (path or s3:// URL)")
    config = loader_config(cfg, env, shuffle=False, remainder="pad", require_labels=True, decode=decode)
    return _build(cfg, run_dir, url, config, transform, sample_transform)


def _build(
    cfg: TrainConfig,
    run_dir: Path,
    url: DataSpec,
    config: LoaderConfig,
    transform: ImageTransform | None,
    sample_transform: SampleTransform | None,
) -> Loader:
    synthetic = parse_synthetic_url(url) if isinstance(url, str) else None
    if synthetic is None:
        index = str(RunDir(run_dir).index)
        return build_loader(url, config, transform=transform, sample_transform=sample_transform, index_dir=index)
    if sample_transform is not None:
        raise ValueError(f"{url}: synthetic data has no detection targets; point the detection stage at COCO shards")
    return SyntheticLoader(
        synthetic,
        batch_size=config.batch_size,
        image_size=cfg.data.image_size,
        rank=config.rank,
        world_size=config.world_size,
        seed=config.seed,
    )
