"""The paper's claims at small scale on Fashion-MNIST, each with the same budgets and seeds.

1. FCMAE pretraining helps fine-tuning: fine-tune top-1 from FCMAE weights vs from scratch.
2. GRN keeps features diverse: feature cosine distance after pretraining, ConvNeXt V2 blocks vs V1-style blocks
   (LayerScale, no GRN). The paper reports feature collapse (low distance) for V1 under FCMAE.
3. Sparse convolution matters: fine-tune top-1 (and pretraining loss) after FCMAE with the sparse encoder vs dense
   convolutions on the masked image.

Every run goes through ``cluster/launch.py --local`` with the demo configs and overrides, so this measures the
product, not a separate script. Prints a table with mean and spread over seeds.

    python bench/fidelity.py --seeds 0 1 --pretrain-steps 300 --finetune-steps 300
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cluster.launch import main as launch

PRETRAIN = {"fcmae_v2_sparse": [], "fcmae_v1_sparse": ["model.block=v1"], "fcmae_v2_dense": ["model.sparse=false"]}
FINETUNE = {"scratch": None, "from_fcmae_v2_sparse": "fcmae_v2_sparse", "from_fcmae_v2_dense": "fcmae_v2_dense"}


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "export" / "metrics.json").read_text())


def _launch(config: str, run_dir: Path, overrides: list[str]) -> dict:
    if not (run_dir / "export" / "metrics.json").exists():
        code = launch(["--config", config, "--local", "--run-dir", str(run_dir), *overrides])
        if code != 0:
            raise RuntimeError(f"{config} in {run_dir} exited with {code}")
    return _metrics(run_dir)


def run_seed(seed: int, out: Path, pretrain_steps: int, finetune_steps: int, val_url: str | None) -> dict[str, dict]:
    """All runs of one seed; returns metrics per run name."""
    results: dict[str, dict] = {}
    for name, extra in PRETRAIN.items():
        overrides = [f"seed={seed}", f"schedule.max_steps={pretrain_steps}", "tracking.log_every=50", *extra]
        results[name] = _launch("demo_fcmae", out / f"seed{seed}" / name, overrides)
    for name, source in FINETUNE.items():
        weights = "null" if source is None else str(out / f"seed{seed}" / source / "export" / "model.safetensors")
        overrides = [f"seed={seed}", f"schedule.max_steps={finetune_steps}", f"model.pretrained={weights}"]
        if val_url:
            overrides.append(f"data.val_url={val_url}")
        results[name] = _launch("demo_finetune", out / f"seed{seed}" / name, overrides)
    return results


def _cell(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--val-url", help="fine-tune evaluation set (default: the demo's 10k test split)")
    args = parser.parse_args()
    per_seed = [run_seed(s, args.out, args.pretrain_steps, args.finetune_steps, args.val_url) for s in args.seeds]

    def column(run: str, key: str) -> list[float]:
        return [float(r[run][key]) for r in per_seed]

    print(f"\n# seeds {args.seeds}, pretrain {args.pretrain_steps} steps, fine-tune {args.finetune_steps} steps")
    print("| claim | run | pretrain loss | feature cosine distance | fine-tune top-1 % |")
    print("|---|---|---|---|---|")
    rows = [
        ("FCMAE vs scratch", "scratch", None),
        ("FCMAE vs scratch", "from_fcmae_v2_sparse", "fcmae_v2_sparse"),
        ("GRN vs V1 block", "fcmae_v2_sparse", "fcmae_v2_sparse"),
        ("GRN vs V1 block", "fcmae_v1_sparse", "fcmae_v1_sparse"),
        ("sparse vs dense conv", "from_fcmae_v2_sparse", "fcmae_v2_sparse"),
        ("sparse vs dense conv", "from_fcmae_v2_dense", "fcmae_v2_dense"),
    ]
    for claim, run, pretrain in rows:
        loss = _cell(column(pretrain, "final_loss")) if pretrain else "-"
        distance = _cell(column(pretrain, "feature_cosine_distance_s4")) if pretrain else "-"
        top1 = _cell(column(run, "top1"), digits=1) if run in FINETUNE else "-"
        print(f"| {claim} | {run} | {loss} | {distance} | {top1} |", flush=True)


if __name__ == "__main__":
    main()
