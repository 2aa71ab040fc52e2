"""Peak memory and step time of one FCMAE train step with and without activation checkpointing, next to the plan.

Each setting runs in a fresh process (peak memory: the process's max RSS on CPU, the allocator's peak on CUDA,
minus what the process held before the step: interpreter, libraries, weights), so the settings cannot inherit
each other's peaks. On CPU the memory run sets ``MALLOC_MMAP_THRESHOLD_=65536``: large blocks are mapped and
returned to the system when freed, so the max RSS follows the live tensors instead of what glibc's arenas retain
(without it a checkpointed step showed 1.8 GiB for 0.7 GiB live); the step time comes from a second run with the
default allocator. The ``plan`` column is the dry-run planner's activation estimate for the same model
(:func:`cluster.plan.activation_bytes`, fp32), which measures the checkpointed model too.

    python bench/activation_memory.py [--size base] [--image-size 224] [--batch 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"off": "false", "stages 3-4": "[false,false,true,true]", "all stages": "true"}


def measure(size: str, image_size: int, batch: int, device: str, flags: str) -> dict[str, float]:
    """One train step in this process: peak memory above the baseline (GiB), step seconds, plan estimate (GiB)."""
    import torch

    from cluster.plan import activation_bytes
    from trainer.config import PretrainConfig, load_config
    from trainer.observability.metrics import peak_memory_gb
    from trainer.stages.pretrain import build_model

    cfg = load_config(
        "demo_fcmae",
        [f"model.size={size}", f"data.image_size={image_size}", f"data.batch_size={batch}",
         f"model.grad_checkpointing={flags}", "model.decoder_dim=512"],
    )  # fmt: skip
    assert isinstance(cfg, PretrainConfig)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).train()
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, 3, image_size, image_size, generator=gen).to(dev)
    mask = model.random_mask(imgs, gen)
    grid = image_size // model.patch_size
    visible = model.visible_patches(grid, grid)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = peak_memory_gb(dev) if dev.type == "cuda" else _rss_now_gb()
    start = time.perf_counter()
    loss, _, _ = model(imgs, mask, visible=visible)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_memory_gb(dev)
    plan = activation_bytes(cfg, batch)
    return {"peak_gb": peak - baseline, "step_s": seconds, "plan_gb": (plan or 0.0) / 2**30}


def _rss_now_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting, print JSON
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.size, args.image_size, args.batch, args.device, args.one)))
        return
    print(
        f"# FCMAE {args.size}, {args.image_size} px, batch {args.batch}, fp32, {args.device}: one train step "
        "(forward + backward) per fresh process"
    )
    print("| grad_checkpointing | peak above baseline GiB | step s | plan activations GiB |")
    print("|---|---|---|---|")
    results = {}
    for name, flags in SETTINGS.items():
        cmd = [sys.executable, __file__, "--size", args.size, "--image-size", str(args.image_size)]
        cmd += ["--batch", str(args.batch), "--device", args.device, "--one", flags]
        memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if args.device == "cpu" else None
        runs = [
            json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO, env=env)
                .stdout.strip()
                .splitlines()[-1]
            )
            for env in (memory_env, None)
        ]
        results[name] = r = {**runs[0], "step_s": runs[1]["step_s"]}
        print(f"| {name} | {r['peak_gb']:.2f} | {r['step_s']:.2f} | {r['plan_gb']:.2f} |", flush=True)
    off, on = results["off"], results["all stages"]
    print(
        f"\nall stages checkpointed: {on['peak_gb'] / off['peak_gb']:.2f}x the peak, "
        f"{on['step_s'] / off['step_s']:.2f}x the step time"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
