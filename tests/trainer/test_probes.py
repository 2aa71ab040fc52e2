"""The representation probes on known cases: kNN on separable and on shuffled labels, RankMe on matrices whose rank
is known, per-stage outputs of the encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from data.loader import LoaderConfig, build_loader
from data.transforms import eval_transform
from models.convnextv2 import build, build_encoder
from tests.support.launch import launch
from trainer.config import PretrainConfig, load_config
from trainer.observability.probes import effective_rank, knn_top1, labeled, pooled, stage_outputs
from trainer.stages.pretrain import random_encoder


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


@pytest.mark.slow
def test_online_knn_and_rank_are_logged_and_equal_an_offline_computation(
    tmp_path: Path, fmnist_shards: str, fmnist_test_shards: str
) -> None:
    """Pretraining on 2 ranks evaluates kNN top-1 (bank: 768 Fashion-MNIST training images; queries: 500 test
    images, split over the ranks and gathered once), the effective rank and the cosine distance of all four stages.
    The last evaluation, on the exported weights, equals the same probes computed here in one process, and so
    does the baseline on the randomly initialized encoder."""
    run_dir = tmp_path / "run"
    overrides = [
        f"data.train_url={fmnist_shards}", f"data.val_url={fmnist_test_shards}", f"eval.knn_bank_url={fmnist_shards}",
        "data.batch_size=8", "schedule.max_steps=4", "eval.every_steps=2",
    ]  # fmt: skip
    assert launch(run_dir, *overrides, ranks=2) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    last = evals[-1]
    assert {f"feature_cosine_distance_s{i}" for i in range(1, 5)} <= last.keys()
    encoder = build("atto", num_classes=0)
    encoder.load_state_dict(load_file(str(run_dir / "export" / "model.safetensors")))
    encoder.eval()

    def features(url: str, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        loader = build_loader(
            url, LoaderConfig(batch_size=8, shuffle=False, remainder="pad"), transform=eval_transform(64)
        )
        out = [(pooled(net.forward_features(b.images)), b.labels) for b in loader]  # type: ignore[operator]
        return labeled(torch.cat([f for f, _ in out]), torch.cat([y for _, y in out]))  # padding slots dropped

    with torch.no_grad():
        bank, bank_labels = features(fmnist_shards, encoder)
        queries, query_labels = features(fmnist_test_shards, encoder)
        cfg = load_config("demo_fcmae")
        assert isinstance(cfg, PretrainConfig)
        initial = random_encoder(cfg).eval()
        random_top1 = knn_top1(
            *features(fmnist_shards, initial), *features(fmnist_test_shards, initial), num_classes=10
        )
    assert last["knn_top1_random"] == pytest.approx(random_top1, abs=0.41)
    offline = knn_top1(bank, bank_labels, queries, query_labels, num_classes=10)
    assert last["knn_top1"] == pytest.approx(offline, abs=0.41)  # at most one of 500 queries on a tie

    # The MLflow run, read back as a person finds it: named and described, its three shard sets as inputs, the
    # export as a logged model, the metrics in sections, and the kNN baseline in a child run under the probe's name
    # (one chart draws both).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.run_name == "demo_fcmae" and run.data.tags["mlflow.note.content"].startswith("pretrain | FCMAE")
    contexts = {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs}
    # the training set is also the kNN bank here: one input in both roles
    assert contexts == {(Path(fmnist_shards).name, "training,knn_bank"), (Path(fmnist_test_shards).name, "validation")}
    assert client.get_logged_model(run.data.tags["logged_model_id"]).source_run_id == run.info.run_id
    assert {"train/loss", "speed/images_per_s", "speed/data_wait_pct", "eval/knn_top1"} <= run.data.metrics.keys()
    probe = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/knn_top1")]
    assert probe == [(r["step"], r["knn_top1"]) for r in evals]
    (baseline,) = client.search_runs([run.info.experiment_id], f"tags.baseline_of = '{run.info.run_id}'")
    assert baseline.info.run_name == "demo_fcmae / random init" and baseline.info.status == "FINISHED"
    assert baseline.data.tags["mlflow.parentRunId"] == run.info.run_id
    history = [(m.step, m.value) for m in client.get_metric_history(baseline.info.run_id, "eval/knn_top1")]
    assert history == [(r["step"], r["knn_top1_random"]) for r in evals]
    assert last["effective_rank"] == pytest.approx(effective_rank(queries), rel=1e-3)
    assert last["knn_images"] == 500.0 and last["knn_bank_images"] == 768.0  # each image once, padding dropped


def test_the_random_baseline_is_an_encoder_of_the_runs_architecture_seeded_by_the_run() -> None:
    def parameters(net: torch.nn.Module) -> set[str]:
        return {name for name, _ in net.named_parameters()}

    v1 = load_config("demo_fcmae", ["model.block=v1"])
    assert isinstance(v1, PretrainConfig)
    baseline = random_encoder(v1)
    assert parameters(baseline) == parameters(build_encoder("atto", block="v1"))
    assert parameters(baseline) != parameters(build_encoder("atto"))  # the control: V2 blocks have other parameters
    again = random_encoder(v1)
    pairs = zip(baseline.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    other = random_encoder(v1.model_copy(update={"seed": v1.seed + 1}))
    assert not torch.equal(baseline.stem.conv.weight, other.stem.conv.weight)
