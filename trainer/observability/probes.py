"""Is pretraining learning? Label-free and labeled probes of the encoder's representation.

* :func:`knn_top1`: the weighted k-nearest-neighbour classifier self-supervised libraries watch during pretraining
  (cosine similarity, the ``k`` most similar bank features vote with weight ``exp(sim / T)``; k=20, T=0.07).
* :func:`effective_rank`: RankMe (Garrido et al., 2023), ``exp`` of the entropy of the normalized singular values
  of a batch of pooled features: how many directions the representation really uses. Collapse shrinks it.
* :func:`stage_outputs`: the dense encoder's output after each of its four stages, for the paper's feature
  cosine-distance statistic (:func:`trainer.stages.fcmae_eval.feature_cosine_distance`) per stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.batch import Batch, Loader
from models.convnextv2 import ConvNeXtV2Encoder
from trainer.distributed import gather_rows
from trainer.evaluation import EvalPasses

RANKME_EPS = 1e-7


@torch.no_grad()
def stage_outputs(encoder: ConvNeXtV2Encoder, images: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps ``(N, C_i, H_i, W_i)`` after each stage of a ConvNeXt V2 encoder (dense, unmasked)."""
    x = encoder.stem(images)
    out = []
    for stage in encoder.stages:
        x = stage(x)
        out.append(x)
    return out


def pooled(features: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled, L2-normalized features ``(N, C)`` of a feature map ``(N, C, H, W)``."""
    return F.normalize(features.float().mean(dim=(2, 3)), dim=1)


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class predictions of L2-normalized ``queries`` ``(M, D)`` by weighted vote of their ``k`` most similar rows
    of the normalized ``bank`` ``(N, D)`` (labels ``(N,)``)."""
    k = min(k, len(bank))
    predictions = []
    for lo in range(0, len(queries), chunk):
        sims = queries[lo : lo + chunk] @ bank.T  # cosine similarity
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(len(top), num_classes, device=bank.device, dtype=torch.float32)
        votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp().float())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (%) of :func:`knn_predict` on labeled queries."""
    predicted = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return 100.0 * float((predicted == query_labels).float().mean()) if len(query_labels) else float("nan")


def effective_rank(features: torch.Tensor) -> float:
    """RankMe of ``(N, D)`` features: ``exp(-sum p log p)`` with ``p = s / |s|_1 + eps`` over the singular values
    ``s``; between 1 (one direction) and ``min(N, D)``."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum() + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


def loader_features(
    encoder: ConvNeXtV2Encoder, loader: Loader, passes: EvalPasses
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pooled, normalized last-stage features and labels of every rank's slice of an evaluation loader (padded slots
    labeled -1), gathered once in rank order; None when a preemption stopped the pass."""
    features, labels = [], []

    def embed(batch: Batch) -> None:
        features.append(pooled(encoder.forward_features(batch.images)))
        labels.append(torch.as_tensor(batch.labels).to(passes.device))

    if not passes.run(loader, embed):
        return None
    if not features:
        return torch.zeros(0, 1, device=passes.device), torch.zeros(0, dtype=torch.long, device=passes.device)
    return gather_rows(torch.cat(features)), gather_rows(torch.cat(labels))


def labeled(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows whose label is a class (padding slots, labeled -1, dropped)."""
    keep = labels >= 0
    return features[keep], labels[keep]
