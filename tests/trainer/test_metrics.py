"""Training metrics: the FLOPs behind MFU (a convolution's backward costs twice its forward, also for grouped convs)
and a throughput that leaves evaluations out."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.convnextv2 import build
from models.fcmae import FCMAE
from trainer.observability import metrics
from trainer.observability.metrics import count_fcmae_flops, flop_counter, peak_flops


def _train_flops(counter: FlopCounterMode, module: nn.Module, x: torch.Tensor) -> int:
    with counter:
        module(x).sum().backward()
    return int(counter.get_total_flops())


def test_depthwise_conv_counts_forward_plus_twice_forward_in_backward() -> None:
    n, c, hw, k = 2, 320, 14, 7
    conv = nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
    x = torch.randn(n, c, hw, hw, requires_grad=True)
    forward = 2 * n * hw * hw * c * k * k  # one multiply-add per output element and filter tap
    assert _train_flops(flop_counter(), conv, x) == 3 * forward  # forward, input gradient, weight gradient
    # Negative control: torch's own formula ignores groups in the weight gradient (c + 1 times the forward).
    assert _train_flops(FlopCounterMode(display=False), conv, x) == (c + 2) * forward


@pytest.mark.parametrize("size", ["atto", "base"])
def test_whole_model_train_flops_are_three_forwards(size: str) -> None:
    model = build(size, num_classes=0)
    x = torch.zeros(1, 3, 224, 224)
    with flop_counter() as counter:
        model(x)
    forward = counter.get_total_flops()
    train = _train_flops(flop_counter(), model, x)
    # Every conv and matmul costs 3x its forward in training, but the stem's input gradient (images need none).
    assert 2.97 * forward < train <= 3 * forward
    assert forward / 1e9 == pytest.approx({"atto": 0.55, "base": 15.4}[size] * 2, rel=0.03)  # 2 FLOPs per MAC


def test_fcmae_masked_flops_are_below_dense() -> None:
    model = FCMAE("atto", decoder_dim=64)
    flops = count_fcmae_flops(model, 224, torch.device("cpu"))
    dense_train = 3 * 2 * 0.55e9  # the dense trunk's training FLOPs at 224 px, from the paper's GFLOPs
    assert flops.masked < flops.dense < 1.2 * dense_train


def test_mfu_peak_is_the_exact_device_for_the_precision() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12  # a substring match on "H100" gave 989
    assert peak_flops("NVIDIA H200", "fp32") == 494.5e12  # TF32 under fp32
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp16") == 312e12
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16") is None  # unknown: no MFU rather than a wrong one


def test_evaluation_time_is_not_counted_in_training_throughput(monkeypatch: pytest.MonkeyPatch) -> None:
    """An interval of 10 steps x 64 images that took 4 s, 3 s of them in an evaluation: 640 images in 1 s of
    training. Control: the same interval without the exclusion reads 160 images/s."""
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
    rates = []
    for excluded in (3.0, 0.0):
        meter = metrics.Meter(samples_per_step=64, world_size=1, total_steps=100)
        meter._window_start = clock[0]
        for _ in range(10):
            meter.add(data_s=0.01)
        clock[0] += 4.0
        meter.exclude(excluded)
        rates.append(meter.flush(10, torch.device("cpu"))["images_per_s"])
    assert rates == [pytest.approx(640.0), pytest.approx(160.0)]
