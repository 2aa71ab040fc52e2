"""Training metrics: throughput, data wait, memory, MFU from counted FLOPs, ETA (the console line that shows them
is :func:`trainer.observability.logger.console_line`)."""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from models.fcmae import FCMAE

log = logging.getLogger(__name__)

# Dense peak FLOP/s by exact CUDA device name (``torch.cuda.get_device_name``) and precision: bf16 tensor cores,
# and TF32 for fp32 runs (cuDNN convolutions use TF32 by default). A substring match would give an H100 PCIe the
# SXM peak (756 vs 989 TFLOP/s). Unknown devices report no MFU rather than a wrong one.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "NVIDIA H100 80GB HBM3": {"bf16": 989e12, "fp32": 494.5e12},  # H100 SXM
    "NVIDIA H200": {"bf16": 989e12, "fp32": 494.5e12},
    "NVIDIA H100 NVL": {"bf16": 835e12, "fp32": 417.5e12},
    "NVIDIA H100 PCIe": {"bf16": 756e12, "fp32": 378e12},
    "NVIDIA A100-SXM4-80GB": {"bf16": 312e12, "fp32": 156e12},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312e12, "fp32": 156e12},
    "NVIDIA A100 80GB PCIe": {"bf16": 312e12, "fp32": 156e12},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312e12, "fp32": 156e12},
}


def peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a device for a run's precision (fp16 runs on the bf16 tensor-core peak), or None."""
    peaks = PEAK_FLOPS.get(device_name.strip())
    return None if peaks is None else peaks["fp32" if precision == "fp32" else "bf16"]


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of this CUDA device for ``precision``; None on CPUs and unknown GPUs (MFU is then not shown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(name, precision)
    if peak is None:
        log.warning(
            "no peak FLOP/s known for %r: MFU is not reported (add it to trainer.observability.metrics.PEAK_FLOPS)",
            name,
        )
    return peak


@dataclass(frozen=True)
class FlopCount:
    """Training FLOPs (forward + backward) per sample: what the masked encoder does, and a dense equivalent."""

    masked: float
    dense: float


def _conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: Any,
    _stride: Any,
    _padding: Any,
    _dilation: Any,
    transposed: bool,
    _output_padding: Any,
    _groups: int,
    output_mask: list[bool],
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    """A convolution's backward: the input gradient and the weight gradient each cost what the forward costs.
    torch 2.14.1's own formula ignores ``groups`` in the weight gradient, so a depthwise 7x7 conv of C channels
    counted C + 1 times its forward (3.7x the true train FLOPs of atto, 5.7x of base)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FLOP_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flops}
"""Corrections to torch's flop counter, registered by :func:`flop_counter`."""


def flop_counter() -> FlopCounterMode:
    """torch's flop counter (matmuls and convolutions) with :data:`FLOP_FORMULAS`: the one way FLOPs are counted."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


def count_fcmae_flops(model: FCMAE, image_size: int, device: torch.device) -> FlopCount:
    """Count FLOPs of one train step on one sample with torch's flop counter (matmuls and convs).

    ``masked`` runs the configured backend (``gather`` does the MLP on visible cells only); ``dense`` runs the
    unmasked trunk on the whole image, which is what a dense-convolution MAE would pay.
    """
    imgs = torch.zeros(1, 3, image_size, image_size, device=device)
    mask = model.random_mask(imgs, torch.Generator().manual_seed(0))
    counts = []
    for dense in (False, True):
        with flop_counter() as counter:
            if dense:
                features = model.encoder.forward_features(imgs)
                loss = model.forward_loss(imgs, model.forward_decoder(features, mask), mask)
            else:
                loss, _, _ = model(imgs, mask)
            loss.backward()
        model.zero_grad(set_to_none=True)
        counts.append(float(counter.get_total_flops()))
    return FlopCount(masked=counts[0], dense=counts[1])


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Interval:
    """Losses since the last log point, summed on the device; read (and reduced over ranks) once per interval."""

    def __init__(self, device: torch.device) -> None:
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, finite micro-batches
        self.grad_norm: Any = None
        self.skipped = False

    def add(self, loss_sum: torch.Tensor, loss_count: torch.Tensor, grad_norm: Any, skipped: bool) -> None:
        """Accumulate one step's finite micro-batch losses (no host read)."""
        self.totals[0] += loss_sum
        self.totals[1] += loss_count
        self.grad_norm, self.skipped = grad_norm, skipped

    def mean_loss(self, counters: Sequence[int] = ()) -> tuple[float, list[int]]:
        """Mean finite micro-batch loss over all ranks and the sums of this rank's ``counters`` over all ranks (one
        all-reduce, one host read); resets the loss sums."""
        totals = torch.cat([self.totals, torch.tensor(counters, dtype=torch.float64).to(self.totals.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        self.totals.zero_()
        loss_sum, count, *summed = totals.tolist()  # sync: the log interval's one read of the losses
        return (loss_sum / count if count else float("nan")), [round(n) for n in summed]

    def grad_norm_value(self) -> float:
        """The last step's global gradient norm (NaN when that step was skipped)."""
        if self.grad_norm is None or self.skipped:
            return float("nan")
        return float(self.grad_norm)  # sync (when DeepSpeed holds a tensor): at log intervals only


@dataclass
class Meter:
    """Accumulates timings between log points and turns them into the metrics of SPEC section 3."""

    samples_per_step: int
    world_size: int
    total_steps: int
    flops: FlopCount | None = None
    peak_flops: float | None = None
    _data_s: float = 0.0
    _steps: int = 0
    _started: float = field(default_factory=time.perf_counter)
    _window_start: float = field(default_factory=time.perf_counter)

    def add(self, data_s: float) -> None:
        """Record one optimizer step and the seconds it waited for data (step time comes from the wall clock)."""
        self._data_s += data_s
        self._steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, reported apart; a profile's writing) out of the interval's wall time."""
        self._window_start += seconds

    def flush(self, step: int, device: torch.device) -> dict[str, float]:
        """Metrics over the steps since the last flush (global throughput assumes ranks run in lockstep)."""
        now = time.perf_counter()
        wall = max(now - self._window_start, 1e-9)
        steps = max(self._steps, 1)
        images_per_s = self.samples_per_step * self._steps / wall
        metrics = {
            "images_per_s": images_per_s,
            "images_per_s_per_device": images_per_s / self.world_size,
            "step_time_s": wall / steps,
            "data_wait_pct": 100.0 * self._data_s / wall,
            "peak_mem_gb": peak_memory_gb(device),
        }
        if self.flops is not None:
            achieved = self.flops.masked * images_per_s / self.world_size
            metrics["tflops_per_device"] = achieved / 1e12
            if self.peak_flops:
                metrics["mfu_pct"] = 100.0 * achieved / self.peak_flops
                metrics["mfu_dense_equiv_pct"] = (
                    100.0 * self.flops.dense * images_per_s / self.world_size / self.peak_flops
                )
        remaining = self.total_steps - step
        metrics["eta_s"] = remaining * wall / steps
        self._data_s = 0.0
        self._steps = 0
        self._window_start = now
        return metrics
