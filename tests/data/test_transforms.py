"""The recipe transforms (timm/torchvision) and their seeded, restart-proof random draws."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import v2

from data.transforms import (
    ImageTransform,
    eval_transform,
    finetune_transform,
    mixup_fn,
    pretrain_transform,
    seeded_rng,
)


@pytest.fixture
def image() -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))


@pytest.mark.parametrize("make", [pretrain_transform, finetune_transform, eval_transform])
def test_transforms_give_normalized_square_tensors_reproducible_under_a_seed(
    make: Callable[[int], ImageTransform], image: PIL.Image.Image
) -> None:
    transform = make(64)
    with seeded_rng(123):
        a = transform(image)
    with seeded_rng(123):
        b = transform(image)
    with seeded_rng(456):
        c = transform(image)
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert a.min() < 0 < a.max()  # ImageNet mean/std normalization, not [0, 1]
    assert torch.equal(a, b)
    assert torch.equal(a, c) == (make is eval_transform)  # only evaluation is deterministic


def test_seeded_rng_restores_the_global_generators(image: PIL.Image.Image) -> None:
    random.seed(5)
    torch.manual_seed(5)
    np.random.seed(5)
    expected = (random.random(), torch.rand(1).item(), np.random.rand())
    random.seed(5)
    torch.manual_seed(5)
    np.random.seed(5)
    with seeded_rng(99):
        finetune_transform(32)(image)  # RandAugment draws from Python and numpy, RandomErasing from torch
    assert (random.random(), torch.rand(1).item(), np.random.rand()) == expected


def test_mixup_is_a_function_of_seed_step_and_rank() -> None:
    images = torch.randn(8, 3, 16, 16)
    labels = torch.arange(8) % 5
    mix = mixup_fn(5, seed=7)
    a_images, a_targets = mix(images.clone(), labels, step=3)  # timm mixes in place
    b_images, b_targets = mix(images.clone(), labels, step=3)
    c_images, _ = mix(images.clone(), labels, step=4)
    d_images, _ = mix(images.clone(), labels, step=3, rank=1)
    assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)
    assert not torch.equal(a_images, c_images) and not torch.equal(a_images, d_images)
    assert a_targets.shape == (8, 5)
    torch.testing.assert_close(a_targets.sum(1), torch.ones(8))
    smooth_only = mixup_fn(5, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1)
    same, soft = smooth_only(images.clone(), labels, step=0)
    assert torch.equal(same, images)
    assert soft.max().item() == pytest.approx(0.92) and soft.min().item() == pytest.approx(0.02)


def test_eval_transform_is_resize_center_crop_normalize(image: PIL.Image.Image) -> None:
    """crop_pct 0.875 at 64 px: shorter side to int(64 / 0.875) = 73 (bicubic), center crop 64, ImageNet normalize,
    computed independently with PIL and numpy."""
    short = int(64 / 0.875)
    w, h = image.size
    resized = image.resize((int(w * short / h), short) if h < w else (short, int(h * short / w)), PIL.Image.BICUBIC)
    left, top = (resized.width - 64) // 2, (resized.height - 64) // 2
    crop = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 255.0
    expected = (crop - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    got = eval_transform(64)(image)
    torch.testing.assert_close(got, torch.from_numpy(expected).permute(2, 0, 1).float(), atol=1e-5, rtol=0)
    # Negative control: crop_pct 1.0 (resize straight to 64) is another image.
    assert not torch.allclose(eval_transform(64, crop_pct=1.0)(image), got, atol=1e-2)


def test_pretrain_crop_follows_the_paper() -> None:
    crop = pretrain_transform(224).transforms[0]  # type: ignore[attr-defined]
    assert isinstance(crop, v2.RandomResizedCrop)
    assert (tuple(crop.size), crop.scale, crop.interpolation) == ((224, 224), (0.2, 1.0), v2.InterpolationMode.BICUBIC)
