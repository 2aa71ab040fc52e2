"""The representation probes on known cases: kNN on separable and on shuffled labels, RankMe on matrices whose rank
is known, per-stage outputs of the encoder."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.convnextv2 import build_encoder
from trainer.probes import effective_rank, knn_top1, pooled, stage_outputs


def _clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    points = centers[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return F.normalize(points, dim=1), labels


def test_knn_is_near_perfect_on_separable_features_and_at_chance_on_shuffled_labels() -> None:
    bank, bank_labels = _clusters(50, 10, 32, spread=0.05, seed=0)
    queries, query_labels = _clusters(20, 10, 32, spread=0.05, seed=0)  # the same centers, new points
    queries = F.normalize(
        queries + 0.05 * torch.randn(queries.shape, generator=torch.Generator().manual_seed(1)), dim=1
    )
    assert knn_top1(bank, bank_labels, queries, query_labels, num_classes=10) == pytest.approx(100.0)
    shuffled = bank_labels[torch.randperm(len(bank_labels), generator=torch.Generator().manual_seed(2))]
    chance = knn_top1(bank, shuffled, queries, query_labels, num_classes=10)
    assert chance < 25.0, chance  # 10 classes: ~10%, far from 100


def test_effective_rank_counts_the_directions_used() -> None:
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))[0]
    for rank in (1, 4, 16):  # equal singular values on `rank` orthogonal directions: RankMe = rank
        coefficients = torch.linalg.qr(torch.randn(256, rank, generator=gen, dtype=torch.float64))[0]
        features = coefficients @ basis[:rank] * 3.0
        assert effective_rank(features) == pytest.approx(rank, rel=1e-3)
    decaying = torch.randn(256, 64, generator=gen, dtype=torch.float64) * torch.logspace(0, -3, 64, dtype=torch.float64)
    assert 1.0 < effective_rank(decaying) < 64.0


def test_stage_outputs_are_the_four_stages_of_the_dense_encoder() -> None:
    torch.manual_seed(0)
    encoder = build_encoder("atto").eval()
    images = torch.randn(2, 3, 64, 64)
    outputs = stage_outputs(encoder, images)
    assert [tuple(o.shape) for o in outputs] == [(2, 40, 16, 16), (2, 80, 8, 8), (2, 160, 4, 4), (2, 320, 2, 2)]
    assert torch.allclose(outputs[-1], encoder.forward_features(images))
    assert pooled(outputs[-1]).norm(dim=1).allclose(torch.ones(2))
    assert not math.isnan(effective_rank(pooled(outputs[-1])))
