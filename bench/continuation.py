"""What continuing FCMAE from pretrained weights buys on a new set, against starting from random weights.

Fashion-MNIST split by class into two sets of another kind of image: the source set (classes 0-4: tops, trousers,
pullovers, dresses, coats) and the target set (classes 5-9: sandals, shirts, sneakers, bags, ankle boots). An
encoder is pretrained on the source set first (one run, what a public checkpoint is to a user), and only its encoder
is kept (``export/model.safetensors``, as the official FCMAE release: no decoder). Then, on the target set and the
same continuation budget, for each seed:

- ``random``: FCMAE from random weights;
- ``continued``: FCMAE from the source encoder with the decoder warm-up (``schedule.decoder_warmup_steps``);
- ``continued_no_warmup``: the same without it;
- ``source_only``: the source encoder as it is (no continuation), for reference.

Each encoder is compared by the pretraining probes on the target set (kNN top-1 of target test images against
target training images, effective rank of their features) and by fine-tuning with few labels (``--labels``
per class of the target training set, drawn from the seed; top-1 on all 5,000 target test images). Every run goes
through ``cluster/launch.py --local``. Prints mean and standard deviation over seeds.

    python -m bench.continuation --seeds 0 1 --source-steps 600 --steps 300 --warmup 50 --finetune-steps 100
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from bench.fidelity import launch_once

DATA = Path("runs/data/fashion-mnist-64")
SOURCE_CLASSES, TARGET_CLASSES = "0,1,2,3,4", "5,6,7,8,9"


def class_set(name: str, split: str, classes: str, *extra: str) -> Path:
    """A Fashion-MNIST subset at 64 px, written once under runs/data/."""
    out = DATA / name
    if not (out / "manifest.json").exists():
        cmd = [sys.executable, "-m", "data.write_shards", "--source", "fashion-mnist", "--split", split]
        cmd += ["--image-size", "64", "--classes", classes, "--samples-per-shard", "5000", *extra]
        subprocess.run([*cmd, "--output", str(out), "--overwrite", "--quiet"], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--source-steps", type=int, default=600, help="pretraining on the source set")
    parser.add_argument("--steps", type=int, default=300, help="the continuation budget on the target set")
    parser.add_argument("--warmup", type=int, default=50, help="decoder warm-up steps of the 'continued' arm")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--labels", type=int, default=10, help="labeled images per class for fine-tuning")
    parser.add_argument("--probe-images", type=int, default=1000, help="kNN bank size = query size")
    parser.add_argument("--out", type=Path, default=Path("runs/continuation"))
    args = parser.parse_args()
    source_train = class_set("source-train", "train", SOURCE_CLASSES)
    target_train = class_set("target-train", "train", TARGET_CLASSES)
    class_set("target-test", "test", TARGET_CLASSES)  # the few-label fine-tuning's evaluation set
    n = args.probe_images
    bank = class_set(f"target-train-{n}", "train", TARGET_CLASSES, "--limit", str(n))
    queries = class_set(f"target-test-{n}", "test", TARGET_CLASSES, "--limit", str(n))
    probe = [f"eval.knn_bank_url={bank}", f"data.val_url={queries}", "tracking.log_every=50"]
    probe.append("tracking.register_as=null")  # demo_fcmae registers its encoder; these runs are measurements

    source_run = args.out / "source"
    launch_once(
        "demo_fcmae", source_run,
        [f"data.train_url={source_train}", "seed=100", f"schedule.max_steps={args.source_steps}",
         f"eval.every_steps={args.source_steps}", *probe],
    )  # fmt: skip
    source = source_run / "export" / "model.safetensors"
    arms = {
        "random": [],
        "continued": [f"model.init_from={source}", f"schedule.decoder_warmup_steps={args.warmup}"],
        "continued_no_warmup": [f"model.init_from={source}"],
    }
    results: dict[str, list[dict]] = {name: [] for name in [*arms, "source_only"]}
    for seed in args.seeds:
        labeled = class_set(
            f"target-train-{args.labels}pc-seed{seed}", "train", TARGET_CLASSES,
            "--per-class", str(args.labels), "--shuffle-seed", str(seed),
        )  # fmt: skip
        base = [f"seed={seed}", f"data.train_url={target_train}", f"schedule.max_steps={args.steps}"]
        for name, extra in arms.items():
            run_dir = args.out / f"seed{seed}" / name
            metrics = launch_once("demo_fcmae", run_dir, [*base, f"eval.every_steps={args.steps}", *probe, *extra])
            weights = run_dir / "export" / "model.safetensors"
            results[name].append(metrics | _finetune(weights, labeled, seed, args, name))
        # The source encoder itself on the target probes: a continuation of no steps (its kNN is the start probe).
        start = results["continued"][-1]
        zero = {"knn_top1": start["knn_top1_start"], "final_loss": float("nan"), "effective_rank": float("nan")}
        results["source_only"].append(zero | _finetune(source, labeled, seed, args, "source_only"))

    print(
        f"\n# seeds {args.seeds}; source: {args.source_steps} steps on classes {SOURCE_CLASSES}; continuation: "
        f"{args.steps} steps x 32 images on classes {TARGET_CLASSES} (decoder warm-up {args.warmup} steps in "
        f"'continued'); fine-tuning: {args.labels} labels per class, {args.finetune_steps} steps; kNN: {n} target "
        "test images against as many target training images"
    )
    print("| arm | pretrain loss | kNN top-1 % at start | kNN top-1 % | effective rank | few-label top-1 % |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():

        def cell(key: str, digits: int = 1, runs: list[dict] = runs) -> str:
            values = [float(r[key]) for r in runs if key in r]
            if not values or any(v != v for v in values):
                return "-"
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"

        at_start = cell("knn_top1_start") if name.startswith("continued") else cell("knn_top1_random")
        print(
            f"| {name} | {cell('final_loss', 3)} | {at_start} | {cell('knn_top1')} | {cell('effective_rank')} "
            f"| {cell('few_label_top1')} |",
            flush=True,
        )


def _finetune(weights: Path, labeled: Path, seed: int, args: argparse.Namespace, name: str) -> dict:
    """Fine-tune ``weights`` on the few-label set and evaluate on the whole target test split."""
    target_test = DATA / "target-test"
    run_dir = args.out / f"seed{seed}" / f"{name}_finetune"
    batch = min(64, args.labels * 5)
    metrics = launch_once(
        "demo_finetune", run_dir,
        [f"seed={seed}", f"model.pretrained={weights}", f"data.train_url={labeled}", f"data.val_url={target_test}",
         f"data.batch_size={batch}", "schedule.epochs=1000", f"schedule.max_steps={args.finetune_steps}",
         "schedule.warmup_epochs=5", "eval.each_epoch=false", "tracking.log_every=50"],
    )  # fmt: skip
    return {"few_label_top1": metrics["top1"]}


if __name__ == "__main__":
    main()
