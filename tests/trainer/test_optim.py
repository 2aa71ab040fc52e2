"""Learning-rate schedule and weight-decay groups."""

from __future__ import annotations

import itertools
import math

import pytest

from models.fcmae import FCMAE
from trainer.config import OptimConfig
from trainer.optim import build_optimizer, lr_at, param_groups, set_lr


def test_warmup_is_linear_and_cosine_ends_at_min_lr() -> None:
    peak, total, warmup = 1e-3, 100, 10
    assert lr_at(0, total, warmup, peak) == pytest.approx(1e-4)
    assert lr_at(4, total, warmup, peak) == pytest.approx(5e-4)
    assert lr_at(9, total, warmup, peak) == pytest.approx(1e-3)
    assert lr_at(10, total, warmup, peak) == pytest.approx(1e-3)
    assert lr_at(55, total, warmup, peak) == pytest.approx(0.5e-3)  # halfway through the cosine
    assert lr_at(100, total, warmup, peak, min_lr=1e-5) == pytest.approx(1e-5)
    values = [lr_at(s, total, warmup, peak) for s in range(10, 100)]
    assert all(b <= a for a, b in itertools.pairwise(values))
    assert lr_at(32, total, 0, peak) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 32 / 100)))


def test_no_decay_on_biases_norms_and_grn() -> None:
    model = FCMAE("atto", decoder_dim=64)
    groups = param_groups(model, weight_decay=0.05)
    by_decay = {g["weight_decay"]: set(g["names"]) for g in groups}
    no_decay, decay = by_decay[0.0], by_decay[0.05]
    assert {"encoder.stages.0.blocks.0.grn.gamma", "encoder.stages.0.blocks.0.grn.beta"} <= no_decay
    assert {"encoder.stem.norm.weight", "encoder.stages.1.downsample.conv.bias", "decoder.0.norm.weight"} <= no_decay
    assert {"encoder.stages.0.blocks.0.pwconv1.weight", "encoder.stem.conv.weight", "pred.weight"} <= decay
    assert not no_decay & decay
    assert no_decay | decay == {n for n, _ in model.named_parameters()}


def test_set_lr_applies_group_scales() -> None:
    model = FCMAE("atto", decoder_dim=64)
    optimizer = build_optimizer(model, OptimConfig(), lr_scale=lambda name: 0.5 if name.startswith("encoder") else 1.0)
    set_lr(optimizer, 1e-3)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [5e-4, 1e-3]
