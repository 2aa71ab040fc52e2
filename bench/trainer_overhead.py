"""What the trainer costs: the launcher's steady-state images/s against a bare PyTorch loop, side by side.

Arms (same model, micro-batch, image size, threads and AdamW; fp32; one rank):

- ``bare``: ``build_model`` + ``build_optimizer`` and a plain ``loss.backward(); opt.step()`` loop over tensors
  already in memory (a pool of batches and masks made before timing).
- ``launcher, synthetic``: ``cluster/launch.py --local`` on ``synthetic://`` data (images made in the main process,
  as cheap as a loader gets): DeepSpeed, the stage, masks per sample key, logging, the watchdog.
- ``launcher, synthetic, ZeRO-0``: the same without ZeRO partitioning: on one rank ZeRO-1 only adds DeepSpeed's
  flat-buffer bookkeeping (gradient and weight copies into its fp32 partition), which this arm leaves out.
- ``launcher, shards``: the launcher on the demo's Fashion-MNIST shards (``make demo`` writes them) with
  ``--workers`` loader workers.

Steady state: the launcher's logged interval images/s after ``--warmup`` steps (evaluation and checkpoints are
pushed past the end); the bare loop times the same steps. Target: launcher / bare >= 0.9.

    python bench/trainer_overhead.py [--size atto] [--image-size 64] [--batch 32] [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import PretrainConfig, load_config  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.stages.pretrain import build_model  # noqa: E402

SHARDS = REPO / "runs" / "data" / "fashion-mnist-64" / "train"


def overrides(args: argparse.Namespace, train_url: str, workers: int) -> list[str]:
    """The config both arms share, and the launcher's logging set so that steps after warmup form intervals."""
    return [
        f"model.size={args.size}",
        f"data.image_size={args.image_size}",
        f"data.batch_size={args.batch}",
        f"data.train_url={train_url}",
        f"data.num_workers={workers}",
        "deepspeed.precision=fp32",
        f"schedule.max_steps={args.warmup + args.steps}",
        f"tracking.log_every={args.log_every}",
        "eval.every_steps=1000000",
        "data.val_url=null",  # no kNN probe: the arms compare training steps
        "eval.knn_bank_url=null",
        "checkpoint.every_steps=1000000",
    ]


def bare(args: argparse.Namespace, threads: int) -> float:
    """images/s of a plain loop over in-memory tensors."""
    torch.set_num_threads(threads)
    cfg = load_config("demo_fcmae", overrides(args, "synthetic://1024", 0))
    assert isinstance(cfg, PretrainConfig)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_optimizer(model, cfg.optim)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    gen = torch.Generator().manual_seed(0)
    grid = args.image_size // model.patch_size
    visible = model.visible_patches(grid, grid)
    pool = []
    for _ in range(4):
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
        pool.append((images, model.random_mask(images, gen)))
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            started = time.perf_counter()
        images, mask = pool[step % len(pool)]
        loss, _, _ = model(images, mask, visible=visible)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return args.batch * args.steps / (time.perf_counter() - started)


def launcher(args: argparse.Namespace, train_url: str, workers: int, zero_stage: int) -> float:
    """Steady-state images/s the launcher logs (intervals after warmup)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        cmd = [sys.executable, str(REPO / "cluster" / "launch.py"), "--local", "--config", "demo_fcmae"]
        cmd += ["--run-dir", str(run_dir), *overrides(args, train_url, workers), f"deepspeed.zero_stage={zero_stage}"]
        subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in records if r["kind"] == "train" and r["step"] > args.warmup]
        # Every interval covers log_every steps: the mean of their rates is the steady-state rate.
        return statistics.mean(r["images_per_s"] for r in steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="atto")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="timed steps (after warmup)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the shards arm")
    parser.add_argument("--zero-stage", type=int, default=1, help="ZeRO stage of the launcher arms (the demo's: 1)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all arms (best of each is reported)")
    args = parser.parse_args()
    if args.warmup % args.log_every or args.steps % args.log_every:
        parser.error("--warmup and --steps must be multiples of --log-every")
    threads = os.cpu_count() or 1  # what the local launcher gives its one rank
    arms: dict[str, list[float]] = {
        "bare": [],
        "launcher, synthetic": [],
        "launcher, synthetic, ZeRO-0": [],
        "launcher, shards": [],
    }
    for _ in range(args.repeats):  # arms interleaved, so that a slow spell of the machine hits all of them
        arms["bare"].append(bare(args, threads))
        arms["launcher, synthetic"].append(launcher(args, "synthetic://100000", 0, args.zero_stage))
        arms["launcher, synthetic, ZeRO-0"].append(launcher(args, "synthetic://100000", 0, 0))
        if (SHARDS / "manifest.json").exists():
            arms["launcher, shards"].append(launcher(args, str(SHARDS), args.workers, args.zero_stage))
    base = max(arms["bare"])
    print(
        f"\nConvNeXt V2-{args.size} FCMAE, {args.image_size} px, batch {args.batch}, fp32, {threads} threads, "
        f"ZeRO-{args.zero_stage}, {args.steps} steps after {args.warmup} warmup, best of {args.repeats}"
    )
    print(f"{'arm':<30} {'images/s':>9} {'vs bare':>8}   runs")
    for name, rates in arms.items():
        if not rates:
            print(f"{name:<30} {'-':>9} {'-':>8}   (no shards: run `make demo` first)")
            continue
        best = max(rates)
        print(f"{name:<30} {best:>9.1f} {best / base:>7.2f}x   {', '.join(f'{r:.1f}' for r in rates)}")


if __name__ == "__main__":
    main()
