"""The paper's claims at small scale on Fashion-MNIST, each with the same budgets and seeds.

1. FCMAE pretraining helps: fine-tune top-1 from FCMAE weights vs from scratch, and the pretrained encoder's kNN
   top-1 against the same kNN on its random initialization.
2. GRN keeps features diverse: per-stage feature cosine distance and the effective rank (RankMe) of pooled features
   after pretraining (and of the same architecture at initialization), ConvNeXt V2 blocks vs V1-style blocks
   (LayerScale, no GRN). The paper reports feature collapse (low distance) for V1 under FCMAE.
3. Sparse convolution matters: fine-tune top-1, kNN top-1 and pretraining loss after FCMAE with the sparse encoder
   vs dense convolutions on the masked image.

Every run goes through ``cluster/launch.py --local`` with the demo configs and overrides, so this measures the
product, not a separate script. Pretraining and fine-tuning run at ``--image-size`` (128 px: a 4x4 patch grid);
the kNN probe uses ``--probe-images`` training images as its bank and as many test images as queries, which are
also the fine-tuning evaluation set (written once under runs/data/ if missing). Prints a table with mean and
standard deviation over seeds.

    python bench/fidelity.py --seeds 0 1 --pretrain-steps 1000 --finetune-steps 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from cluster.launch import main as launch
from data.loader import LoaderConfig, build_loader
from data.transforms import eval_transform
from trainer.config import PretrainConfig, load_config
from trainer.evaluation import EvalPasses
from trainer.observability.probes import effective_rank, labeled, loader_features
from trainer.stages.pretrain import random_encoder

DATA = Path("runs/data/fashion-mnist-64")
PRETRAIN = {"fcmae_v2_sparse": [], "fcmae_v1_sparse": ["model.block=v1"], "fcmae_v2_dense": ["model.sparse=false"]}
FINETUNE = {"scratch": None, "from_fcmae_v2_sparse": "fcmae_v2_sparse", "from_fcmae_v2_dense": "fcmae_v2_dense"}
STAGES = ("s1", "s2", "s3", "s4")


def probe_set(split: str, images: int) -> Path:
    """The first ``images`` samples of a Fashion-MNIST split at 64 px, written once."""
    out = DATA / f"{split}-{images}"
    if not (out / "manifest.json").exists():
        cmd = [sys.executable, "-m", "data.write_shards", "--source", "fashion-mnist", "--split", split]
        cmd += ["--image-size", "64", "--limit", str(images), "--samples-per-shard", "1000"]
        subprocess.run([*cmd, "--output", str(out), "--overwrite", "--quiet"], check=True)
    return out


def launch_once(config: str, run_dir: Path, overrides: list[str]) -> dict:
    """Run ``config`` through ``cluster/launch.py --local`` in ``run_dir`` unless it finished there already; returns
    its ``export/metrics.json`` (a bench re-run picks up where it stopped)."""
    metrics = run_dir / "export" / "metrics.json"
    if not metrics.exists():
        code = launch(["--config", config, "--local", "--run-dir", str(run_dir), *overrides])
        if code != 0:
            raise RuntimeError(f"{config} in {run_dir} exited with {code}")
    return json.loads(metrics.read_text())


def rank_at_init(overrides: list[str], queries: Path, image_size: int) -> float:
    """The effective rank of the query features of a run's encoder before training: the run's own kNN baseline
    encoder (:func:`trainer.stages.pretrain.random_encoder`) through the probe's decoding, transform and pooling."""
    cfg = load_config("demo_fcmae", overrides)
    assert isinstance(cfg, PretrainConfig)
    loader: Any = build_loader(
        str(queries),
        LoaderConfig(batch_size=64, shuffle=False, remainder="pad", decode="tensor"),
        transform=eval_transform(image_size),
    )
    with torch.no_grad():
        embedded = loader_features(random_encoder(cfg).eval(), loader, EvalPasses(torch.device("cpu"), lambda: False))
    assert embedded is not None  # nothing stops it
    return effective_rank(labeled(*embedded)[0])


def run_seed(seed: int, args: argparse.Namespace, bank: Path, queries: Path) -> dict[str, dict]:
    """All runs of one seed; returns metrics per run name."""
    results: dict[str, dict] = {}
    size = f"data.image_size={args.image_size}"
    for name, extra in PRETRAIN.items():
        overrides = [f"seed={seed}", f"schedule.max_steps={args.pretrain_steps}", size, "tracking.log_every=50"]
        # One evaluation, at the end (plus the random-encoder baseline before the first step).
        overrides += [f"eval.every_steps={args.pretrain_steps}", f"eval.knn_bank_url={bank}", f"data.val_url={queries}"]
        results[name] = launch_once("demo_fcmae", args.out / f"seed{seed}" / name, [*overrides, *extra])
        results[name]["effective_rank_init"] = rank_at_init([*overrides, *extra], queries, args.image_size)
    for name, source in FINETUNE.items():
        weights = "null" if source is None else str(args.out / f"seed{seed}" / source / "export" / "model.safetensors")
        overrides = [f"seed={seed}", f"schedule.max_steps={args.finetune_steps}", size, f"model.pretrained={weights}"]
        results[name] = launch_once(
            "demo_finetune", args.out / f"seed{seed}" / name, [*overrides, f"data.val_url={queries}"]
        )
    return results


def _cell(values: list[float], digits: int = 3) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--probe-images", type=int, default=2000, help="kNN bank size = query and fine-tune eval size")
    parser.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    args = parser.parse_args()
    bank, queries = probe_set("train", args.probe_images), probe_set("test", args.probe_images)
    per_seed = [run_seed(seed, args, bank, queries) for seed in args.seeds]

    def cell(run: str | None, key: str, digits: int = 3) -> str:
        return "-" if run is None else _cell([float(r[run][key]) for r in per_seed], digits)

    print(
        f"\n# seeds {args.seeds}, {args.image_size} px, pretrain {args.pretrain_steps} steps x 32 images, "
        f"fine-tune {args.finetune_steps} steps x 64 images, kNN bank/queries/eval {args.probe_images} images"
    )
    print(
        "| claim | run | pretrain loss | kNN top-1 % | kNN top-1 % at init | effective rank | effective rank at init "
        "| fine-tune top-1 % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = [
        ("FCMAE vs scratch", "scratch", None),
        ("FCMAE vs scratch", "from_fcmae_v2_sparse", "fcmae_v2_sparse"),
        ("GRN vs V1 block", "fcmae_v2_sparse", "fcmae_v2_sparse"),
        ("GRN vs V1 block", "fcmae_v1_sparse", "fcmae_v1_sparse"),
        ("sparse vs dense conv", "from_fcmae_v2_sparse", "fcmae_v2_sparse"),
        ("sparse vs dense conv", "from_fcmae_v2_dense", "fcmae_v2_dense"),
    ]
    for claim, run, pretrain in rows:
        top1 = cell(run, "top1", 1) if run in FINETUNE else "-"
        print(
            f"| {claim} | {run} | {cell(pretrain, 'final_loss')} | {cell(pretrain, 'knn_top1', 1)} "
            f"| {cell(pretrain, 'knn_top1_random', 1)} | {cell(pretrain, 'effective_rank', 1)} "
            f"| {cell(pretrain, 'effective_rank_init', 1)} | {top1} |"
        )
    print("\n| pretraining run | " + " | ".join(f"feature cosine distance {s}" for s in STAGES) + " |")
    print("|---|" + "---|" * len(STAGES))
    for run in PRETRAIN:
        cells = " | ".join(cell(run, f"feature_cosine_distance_{s}") for s in STAGES)
        print(f"| {run} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
