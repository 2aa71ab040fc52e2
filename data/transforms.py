"""Image transforms of the ConvNeXt V2 recipes (timm/torchvision), and reproducible random draws for them.

torchvision and timm draw from the global torch, Python and numpy generators. :func:`seeded_rng` forks all three
around one call and seeds them from a derived seed, so a transform's draws depend only on (run seed, epoch,
sample position) or (run seed, step, rank), never on how long a process has been running: a resumed run and
dataloader workers draw exactly what the uninterrupted run draws.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import v2

from data.sampling import derive_seed

ImageTransform = Callable[[Any], torch.Tensor]
"""A per-sample transform: RGB PIL image -> float tensor (3, H, W). Those made of torchvision v2 transforms (the
pretraining crop) take an RGB uint8 ``(3, H, W)`` tensor as well (a loader with ``decode="tensor"``)."""

TAG_MIXUP = 4


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with torch (CPU), Python and numpy global generators seeded from ``seed``; restore them after."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: torch.manual_seed also queues lazy CUDA/MPS/XPU seeding, each recording a Python
        # stack trace (~0.8 ms a call, a fifth of a sample's decode-and-crop time at 224 px).
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def pretrain_transform(size: int, scale: tuple[float, float] = (0.2, 1.0)) -> ImageTransform:
    """FCMAE pretraining: RandomResizedCrop(size, scale 0.2-1.0, bicubic), horizontal flip, ImageNet normalize."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD)),
            v2.ToPureTensor(),
        ]
    )


def finetune_transform(size: int, auto_augment: str = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25) -> ImageTransform:
    """Fine-tuning (timm, as the official recipe): RandomResizedCrop bicubic, flip, RandAugment m9 mstd0.5,
    normalize, RandomErasing (pixel mode, probability ``re_prob``)."""
    return create_transform(
        input_size=size,
        is_training=True,
        auto_augment=auto_augment,
        interpolation="bicubic",
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
    )


def eval_transform(size: int, crop_pct: float = 0.875) -> ImageTransform:
    """Evaluation: resize the shorter side to ``floor(size / crop_pct)`` (bicubic), center crop ``size``, normalize
    (timm's evaluation transform, made of torchvision v2 ops so that it takes uint8 tensors as well as PIL)."""
    return v2.Compose(
        [
            v2.Resize(math.floor(size / crop_pct), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(IMAGENET_DEFAULT_MEAN), std=list(IMAGENET_DEFAULT_STD)),
            v2.ToPureTensor(),
        ]
    )


def to_tensor_transform() -> ImageTransform:
    """No augmentation: RGB PIL image -> float tensor in [0, 1] (for tests and raw pixel access)."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])


class SeededMixup:
    """timm's Mixup/CutMix with label smoothing, its draws derived from (run seed, step, rank).

    Call it on a batch: ``images, soft_targets = mix(images, labels, step=step, rank=rank)``. Like timm, it mixes
    ``images`` in place (and returns it). The batch size must be even (each sample is mixed with its mirror).
    """

    def __init__(self, mixup: Mixup, seed: int) -> None:
        self.mixup = mixup
        self.seed = seed

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, *, step: int, rank: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets ``(N, num_classes)`` for training ``step`` on ``rank``."""
        with seeded_rng(derive_seed(self.seed, TAG_MIXUP, step, rank)):
            mixed, targets = self.mixup(images, labels)
        return mixed, targets


def mixup_fn(
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    seed: int = 0,
) -> SeededMixup:
    """The fine-tune batch transform (ConvNeXt recipe defaults: mixup 0.8, cutmix 1.0, smoothing 0.1).

    With both alphas 0 it only applies label smoothing (soft one-hot targets).
    """
    mixup = Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode="batch",
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
    # timm's switch for "targets only": with both alphas 0 it would otherwise assert on the first call.
    mixup.mixup_enabled = mixup_alpha > 0 or cutmix_alpha > 0
    return SeededMixup(mixup, seed)
