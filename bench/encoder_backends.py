"""Forward+backward time of one FCMAE train step: ``dense_masked`` vs ``gather`` vs an unmasked dense encoder.

Backends are timed interleaved (one step of each in turn, per repeat) so that load on the machine hits them
alike; the table reports the median step time and the speed-up of each backend over ``dense_masked``.

    python bench/encoder_backends.py                      # atto, tiny, base at 224 px, CPU fp32
    python bench/encoder_backends.py --device cuda --dtype bf16 --sizes base large huge --batch 64
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch

from models.fcmae import FCMAE

VARIANTS = ("dense_masked", "gather", "unmasked_dense")


def _step_fn(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor, variant: str, dtype: torch.dtype) -> Callable:
    def step() -> None:
        autocast = torch.autocast(imgs.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with autocast:
            if variant == "unmasked_dense":
                features = model.encoder.forward_features(imgs)
                pred = model.forward_decoder(features, mask)
                loss = model.forward_loss(imgs, pred, mask)
            else:
                model.backend = variant
                loss, _, _ = model(imgs, mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_size(
    size: str, batch: int, image_size: int, repeats: int, device: torch.device, dtype: torch.dtype
) -> dict[str, list[float]]:
    """Median-able step times (seconds) per variant for one model size."""
    torch.manual_seed(0)
    model = FCMAE(size).to(device).train()
    imgs = torch.randn(batch, 3, image_size, image_size, device=device)
    mask = model.random_mask(imgs, torch.Generator().manual_seed(0))
    steps = {v: _step_fn(model, imgs, mask, v, dtype) for v in VARIANTS}
    for step in steps.values():  # warm-up: allocator, kernels, autotuning
        step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[variant].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["atto", "tiny", "base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"# FCMAE train step (fwd+bwd), mask 0.6, batch {args.batch}, {args.image_size}px, {args.dtype}, "
        f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.date.today()}"
    )
    header = "| size | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | gather / dense_masked | gather / unmasked |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for size in args.sizes:
        times = bench_size(size, args.batch, args.image_size, args.repeats, device, dtype)
        med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        cells = " | ".join(f"{med[v]:.1f}" for v in VARIANTS)
        print(
            f"| {size} | {cells} | {med['dense_masked'] / med['gather']:.2f}x | "
            f"{med['unmasked_dense'] / med['gather']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
