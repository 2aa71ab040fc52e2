"""Learning-rate schedule and weight-decay groups."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from torch import nn

from models.convnextv2 import GRN, build
from models.fcmae import FCMAE
from trainer.config import OptimConfig
from trainer.optim import build_optimizer, lr_at, set_lr


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


def _spec_weight_decay(model: nn.Module, weight_decay: float) -> dict[str, float]:
    """SPEC section 1, from module types rather than shapes: no decay on biases, norm parameters and GRN
    gamma/beta; every other parameter (conv and linear weights, the mask token) decays."""
    expected = {}
    for module_name, module in model.named_modules():
        for leaf, _ in module.named_parameters(recurse=False):
            exempt = leaf == "bias" or isinstance(module, (nn.LayerNorm, GRN))
            expected[f"{module_name}.{leaf}" if module_name else leaf] = 0.0 if exempt else weight_decay
    return expected


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_no_decay_on_biases_norms_and_grn(stage: str) -> None:
    if stage == "pretrain":
        model: nn.Module = FCMAE("atto", decoder_dim=64)
        optimizer = build_optimizer(model, OptimConfig())
    else:  # a classifier with per-layer lr scales: more groups, the same rule
        model = build("atto", num_classes=10)
        optimizer = build_optimizer(model, OptimConfig(), lr_scale=lambda name: 0.5 if "stages.0" in name else 1.0)
    expected = _spec_weight_decay(model, OptimConfig().weight_decay)
    assert any(wd == 0.0 for wd in expected.values()) and any(wd > 0 for wd in expected.values())
    # What AdamW applies: every parameter in exactly one group, with the weight decay the SPEC rule gives.
    in_groups = Counter(id(p) for group in optimizer.param_groups for p in group["params"])
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert named.keys() == expected.keys()
    assert sorted(in_groups) == sorted(id(p) for p in named.values())
    assert set(in_groups.values()) == {1}
    wrong = {name: decay_of[id(p)] for name, p in named.items() if decay_of[id(p)] != expected[name]}
    assert not wrong, f"weight decay differs from the SPEC rule: {wrong}"


def test_set_lr_applies_group_scales() -> None:
    model = FCMAE("atto", decoder_dim=64)
    optimizer = build_optimizer(model, OptimConfig(), lr_scale=lambda name: 0.5 if name.startswith("encoder") else 1.0)
    set_lr(optimizer, 1e-3)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [5e-4, 1e-3]
