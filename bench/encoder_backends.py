"""Forward+backward time of one FCMAE train step: ``dense_masked`` vs ``gather`` vs an unmasked dense encoder.

Variants are timed interleaved (one step of each in turn, per repeat) so that load on the machine hits them
alike; the table reports the median step time, images/s, the peak memory of each variant's step, MFU (on GPUs in
:data:`trainer.observability.metrics.PEAK_FLOPS`: the FLOPs each variant really does, counted by
:func:`~trainer.observability.metrics.flop_counter`) and the speed-up of each variant over ``dense_masked``.
``--compile`` adds ``torch.compile``-d copies of the two masked backends (compiled once before timing).

    python bench/encoder_backends.py                      # atto, tiny, base at 224 px, CPU fp32
    python bench/encoder_backends.py --device cuda --dtype bf16 --sizes base large huge --batch 64 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch

from models.fcmae import FCMAE
from trainer.observability.metrics import flop_counter, peak_flops, peak_memory_gb

VARIANTS = ("dense_masked", "gather", "unmasked_dense")


def _step_fn(model: FCMAE, imgs: torch.Tensor, mask: torch.Tensor, variant: str, dtype: torch.dtype) -> Callable:
    grid = imgs.shape[-1] // model.patch_size
    visible = model.visible_patches(grid, grid)

    def step() -> None:
        autocast = torch.autocast(imgs.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with autocast:
            if variant == "unmasked_dense":
                features = model.encoder.forward_features(imgs)
                pred = model.forward_decoder(features, mask)
                loss = model.forward_loss(imgs, pred, mask)
            else:
                loss, _, _ = model(imgs, mask, visible=visible)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variants(model: FCMAE, compile_: bool) -> dict[str, tuple[FCMAE, str]]:
    """Variant name -> (model to run, how); compiled variants run their own compiled copy."""
    variants: dict[str, tuple[FCMAE, str]] = {}
    for name in VARIANTS:
        copy_ = copy.deepcopy(model)
        if name != "unmasked_dense":
            copy_.backend = name
        variants[name] = (copy_, name)
        if compile_ and name != "unmasked_dense":
            compiled = copy.deepcopy(copy_)
            compiled.compile()
            variants[f"{name}+compile"] = (compiled, name)
    return variants


def bench_size(
    size: str, batch: int, image_size: int, repeats: int, device: torch.device, dtype: torch.dtype, compile_: bool
) -> dict[str, dict[str, float]]:
    """Per variant: median step seconds, peak memory (GiB) and train FLOPs per step."""
    torch.manual_seed(0)
    model = FCMAE(size).to(device).train()
    imgs = torch.randn(batch, 3, image_size, image_size, device=device)
    mask = model.random_mask(imgs, torch.Generator().manual_seed(0))
    variants = _variants(model, compile_)
    del model
    steps = {name: _step_fn(m, imgs, mask, how, dtype) for name, (m, how) in variants.items()}
    stats: dict[str, dict[str, float]] = {}
    for name, step in steps.items():  # warm-up (allocator, kernels, autotuning, compilation), peak memory, FLOPs
        step()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        # On CPU the only peak is the process's max RSS, which never falls: it cannot tell variants apart.
        stats[name] = {"peak_gb": peak_memory_gb(device) if device.type == "cuda" else float("nan")}
        if not name.endswith("+compile"):  # the flop counter sees aten ops: count the eager variant
            with flop_counter() as counter:
                step()
            stats[name]["flops"] = float(counter.get_total_flops())
        else:
            stats[name]["flops"] = stats[name.removesuffix("+compile")]["flops"]
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        stats[name]["step_s"] = statistics.median(t)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["atto", "tiny", "base"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile-d gather and dense_masked")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_flops(where, args.dtype) if device.type == "cuda" else None
    print(
        f"# FCMAE train step (fwd+bwd), mask 0.6, batch {args.batch}, {args.image_size}px, {args.dtype}, "
        f"{where}, {torch.get_num_threads()} threads, torch {torch.__version__}, {datetime.date.today()}"
    )
    print("| size | variant | ms/step | images/s | peak GiB | TFLOP/s | MFU | vs dense_masked |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        stats = bench_size(size, args.batch, args.image_size, args.repeats, device, dtype, args.compile)
        reference = stats["dense_masked"]["step_s"]
        for name, s in stats.items():
            tflops = s["flops"] / s["step_s"] / 1e12
            mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak else "-"
            print(
                f"| {size} | {name} | {s['step_s'] * 1e3:.1f} | {args.batch / s['step_s']:.1f} | "
                f"{'-' if s['peak_gb'] != s['peak_gb'] else format(s['peak_gb'], '.2f')} | {tflops:.2f} | {mfu} | "
                f"{reference / s['step_s']:.2f}x |",
                flush=True,
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
