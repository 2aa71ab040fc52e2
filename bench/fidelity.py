"""The paper's three claims at small scale on Fashion-MNIST, judged where pretraining pays: with few labels.

Encoders, per seed: FCMAE with ConvNeXt V2 blocks and the sparse encoder (the method), FCMAE with dense
convolutions on the masked image (claim 3: sparse convolution matters), FCMAE with ConvNeXt V1 blocks (claim 2: GRN
keeps features diverse), and random weights (claim 1: FCMAE pretraining helps). Each encoder is then

- fine-tuned with 10 and with 100 labels per class (sets carved by the writer from the seed,
  ``data.write_shards --per-class N --shuffle-seed S``: every encoder of a seed sees the same labeled images);
- linearly probed (``finetune.linear_probe``: frozen trunk, BatchNorm + linear head) on all 60,000 training labels;

and scored by top-1 on the full 10,000-image test split. The pretraining runs also log the kNN probe, the effective
rank and the per-stage feature cosine distance (the paper's statistic for the GRN claim). Every run goes through
``cluster/launch.py --local`` and is skipped when its run directory holds a finished export, so an interrupted bench
resumes where it stopped (a run cut mid-way resumes from its checkpoint). Several bench processes started side by
side on the same ``--out`` share the runs (each takes the next one nobody holds): on 2 cores, two processes with one
thread each finish about 1.5x sooner than one with two.

A seed whose 15 runs have all finished is written to ``--record`` (``bench/fidelity_seeds.jsonl``, kept in the
repository: each run's ``metrics.json``, with the budget, date, machine and commit) and is not run again for that
budget: ``runs/`` is scratch that a machine may lose, and the table gathers seeds recorded on different days. The
default budget is what a 2-core machine finishes a seed of in 77-95 minutes (two processes): 1,500 FCMAE steps x
32 images at 96 px (48,000 images, 0.8 epoch), 200 few-label steps; 3,000 FCMAE steps make a seed about 2.5 hours.
Prints mean ± standard deviation over the seeds, and which gaps exceed two standard deviations of both arms.

    python -m bench.fidelity --seeds 0 1 2                     # 1,500 FCMAE steps, 200 few-label steps
    for i in 1 2; do OMP_NUM_THREADS=1 python -m bench.fidelity & done; wait   # two processes sharing the runs
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.launch import main as launch

DATA = Path("runs/data/fashion-mnist-64")
RECORD = Path(__file__).with_name("fidelity_seeds.jsonl")
PRETRAIN = {"fcmae_v2_sparse": [], "fcmae_v2_dense": ["model.sparse=false"], "fcmae_v1_sparse": ["model.block=v1"]}
ENCODERS = [*PRETRAIN, "random"]
PROTOCOLS = ("labels_10", "labels_100", "linear_probe")
STAGES = ("s1", "s2", "s3", "s4")
CLAIMS = [  # (claim, the method's arm, the arm it must beat)
    ("1. FCMAE pretraining helps", "fcmae_v2_sparse", "random"),
    ("2. GRN (V2 blocks) beats V1 blocks", "fcmae_v2_sparse", "fcmae_v1_sparse"),
    ("3. sparse beats dense convolution", "fcmae_v2_sparse", "fcmae_v2_dense"),
]


@dataclass(frozen=True)
class Run:
    """One launch of the bench: where its metrics go in the table, the recipe, its run directory, the shard sets it
    reads (written first) and the pretraining runs whose exports it loads."""

    seed: int
    key: str  # "encoder" for a pretraining run, "encoder/protocol" for a downstream one
    config: str
    run_dir: Path
    overrides: tuple[str, ...]
    sets: tuple[tuple[str, ...], ...] = ()  # shard_set arguments
    needs: tuple[Path, ...] = ()

    @property
    def metrics(self) -> Path:
        return self.run_dir / "export" / "metrics.json"


class Records:
    """The finished seeds of one budget in the record file: one JSON line per seed, appended once (under a lock:
    bench processes side by side finish seeds too)."""

    def __init__(self, path: Path, budget: dict[str, int]) -> None:
        self.path, self.budget = path, budget

    def seeds(self) -> dict[int, dict[str, Any]]:
        """Seed -> its record, for this budget."""
        if not self.path.exists():
            return {}
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return {int(r["seed"]): r for r in lines if r["budget"] == self.budget}

    def add(self, runs: list[Run]) -> None:
        """Record each seed of ``runs`` whose runs have all exported and that is not recorded yet."""
        for seed in sorted({run.seed for run in runs}):
            mine = [run for run in runs if run.seed == seed]
            if all(run.metrics.exists() for run in mine) and self._append(seed, mine):
                print(f"[bench] seed {seed} recorded in {self.path}", flush=True)

    def _append(self, seed: int, runs: list[Run]) -> bool:
        with open(self.path.with_name(f"{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if seed in self.seeds():
                return False
            record = {
                "seed": seed, "budget": self.budget, "date": time.strftime("%Y-%m-%d"), "machine": _machine(),
                "commit": _commit(), "runs": {run.key: json.loads(run.metrics.read_text()) for run in runs},
            }  # fmt: skip
            with open(self.path, "a") as out:
                out.write(json.dumps(record) + "\n")
        return True


def _machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
    return f"{models[0] if models else platform.machine()}, {os.cpu_count()} cores"


def _commit() -> str:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    return git.stdout.strip() or "unknown"


def shard_set(name: str, split: str, *extra: str) -> Path:
    """A Fashion-MNIST set at 64 px under runs/data/, written once (under a lock: bench processes side by side
    need the same sets)."""
    out = DATA / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").exists():
            cmd = [sys.executable, "-m", "data.write_shards", "--source", "fashion-mnist", "--split", split]
            cmd += ["--image-size", "64", "--samples-per-shard", "5000", *extra]
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


def seed_runs(seed: int, args: argparse.Namespace) -> list[Run]:
    """Every run of one seed, pretraining first."""
    out = args.out / f"seed{seed}"
    knn = (("knn-train", "train", "--limit", "500"), ("knn-test", "test", "--limit", "500"))
    bank, queries = DATA / "knn-train", DATA / "knn-test"
    train, test = DATA / "train", DATA / "test"
    runs = []
    for name, extra in PRETRAIN.items():
        steps = args.pretrain_steps
        overrides = [f"seed={seed}", "schedule.epochs=100", f"schedule.max_steps={steps}",
                     f"data.image_size={args.image_size}",
                     f"eval.every_steps={steps}", f"eval.knn_bank_url={bank}", f"data.val_url={queries}",
                     "tracking.log_every=100", "tracking.register_as=null",
                     f"checkpoint.every_steps={steps // 10}", *extra]  # fmt: skip
        runs.append(Run(seed, name, "demo_fcmae", out / name, tuple(overrides), (*knn, ("train", "train"))))

    def weights(encoder: str) -> tuple[str, tuple[Path, ...]]:
        if encoder == "random":
            return "null", ()
        return str(out / encoder / "export" / "model.safetensors"), (out / encoder,)

    for labels in (10, 100):
        carved = (f"train-{labels}pc-seed{seed}", "train", "--per-class", str(labels), "--shuffle-seed", str(seed))
        batch = min(64, labels * 10 // 2)
        for encoder in ENCODERS:
            path, needs = weights(encoder)
            overrides = [f"seed={seed}", f"model.pretrained={path}", *_classifier(encoder),
                         f"data.train_url={DATA / carved[0]}", f"data.val_url={test}", f"data.batch_size={batch}",
                         "schedule.epochs=100000", f"schedule.max_steps={args.finetune_steps}",
                         "schedule.warmup_epochs=0", "eval.each_epoch=false", "tracking.log_every=100"]  # fmt: skip
            run_dir = out / f"{encoder}_labels{labels}"
            key, sets = f"{encoder}/labels_{labels}", (carved, ("test", "test"))
            runs.append(Run(seed, key, "demo_finetune", run_dir, tuple(overrides), sets, needs))
    for encoder in ENCODERS:
        path, needs = weights(encoder)
        overrides = [f"seed={seed}", f"model.pretrained={path}", *_classifier(encoder), f"data.train_url={train}",
                     f"data.val_url={test}",
                     f"schedule.max_steps={args.probe_steps}", "tracking.log_every=100"]  # fmt: skip
        run = Run(seed, f"{encoder}/linear_probe", "demo_linprobe", out / f"{encoder}_linprobe", tuple(overrides),
                  (("train", "train"), ("test", "test")), needs)  # fmt: skip
        runs.append(run)
    return runs


def run_all(runs: list[Run], finished: Callable[[], None]) -> None:
    """Run every launch that has not finished, in order, sharing the work with any other bench process on the same
    ``--out``: a run another process holds (an ``flock`` beside its run directory) is left to it, one whose
    pretraining is not exported yet waits, and this process takes the first run it can. A run that failed elsewhere
    releases its lock and is retried here, so an error still ends the bench. ``finished`` is called after each
    run."""
    pending = [run for run in runs if not run.metrics.exists()]
    print(f"[bench] {len(runs) - len(pending)} of {len(runs)} runs finished already", flush=True)
    while pending:
        for run in pending:
            if run.metrics.exists() or not all((need / "export" / "metrics.json").exists() for need in run.needs):
                continue
            run.run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(run.run_dir.with_name(f"{run.run_dir.name}.bench-lock"), "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another bench process runs it
                if not run.metrics.exists():
                    for spec in run.sets:
                        shard_set(*spec)
                    print(f"[bench] {run.run_dir}: {run.config} (pid {os.getpid()})", flush=True)
                    launch_once(run.config, run.run_dir, list(run.overrides))
            break
        else:
            time.sleep(15)  # everything left is running elsewhere or waits for a pretraining run
        pending = [run for run in pending if not run.metrics.exists()]
        finished()
        print(f"[bench] {len(runs) - len(pending)} of {len(runs)} runs finished", flush=True)


def _classifier(encoder: str) -> list[str]:
    """The classifier that loads an encoder: V1 blocks for the V1 ablation's."""
    return ["model.block=v1"] if "model.block=v1" in PRETRAIN.get(encoder, []) else []


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], digits: int = 1) -> str:
    mean, spread = _stats(values)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--finetune-steps", type=int, default=200, help="few-label fine-tuning steps")
    parser.add_argument("--probe-steps", type=int, default=600, help="linear probe steps (batch 64)")
    parser.add_argument("--image-size", type=int, default=96, help="pretraining crop (fine-tuning runs at 64)")
    parser.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--record", type=Path, default=RECORD, help="finished seeds (JSON lines), kept in the repo")
    args = parser.parse_args()
    budget = {"pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
              "probe_steps": args.probe_steps, "image_size": args.image_size}  # fmt: skip
    records = Records(args.record, budget)
    todo = [seed for seed in args.seeds if seed not in records.seeds()]
    print(f"[bench] seeds recorded already for this budget: {sorted(set(args.seeds) - set(todo))}", flush=True)
    runs = [run for seed in todo for run in seed_runs(seed, args)]
    run_all(runs, lambda: records.add(runs))
    records.add(runs)  # also the seeds whose runs had all finished before this bench started
    recorded = records.seeds()
    per_seed = [recorded[seed]["runs"] for seed in args.seeds]

    def values(run: str, key: str) -> list[float]:
        return [float(r[run][key]) for r in per_seed]

    def measured(arm: str, measure: str) -> list[float] | None:
        """An arm's values of a measure: a protocol's top-1, or a probe of the pretrained encoder (random weights:
        the kNN probe at init of the method's architecture; no rank)."""
        if measure in PROTOCOLS:
            return values(f"{arm}/{measure}", "top1")
        if arm in PRETRAIN:
            return values(arm, measure)
        return values("fcmae_v2_sparse", "knn_top1_random") if measure == "knn_top1" else None

    def cell(run: str, key: str, digits: int = 1) -> str:
        return _cell(values(run, key), digits)

    for seed in args.seeds:
        r = recorded[seed]
        print(f"# seed {seed}: recorded {r['date']} on {r['machine']} at commit {r['commit']}")
    print(
        f"\n# seeds {args.seeds}; pretraining {args.pretrain_steps} steps x 32 images at {args.image_size} px; "
        f"few-label fine-tuning {args.finetune_steps} steps; linear probe {args.probe_steps} steps x 64 images on "
        "60,000 labels; top-1 on the 10,000 test images"
    )
    print(
        "| encoder | pretrain loss | kNN top-1 % | kNN top-1 % at init | effective rank | 10 labels/class % "
        "| 100 labels/class % | linear probe % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for encoder in ENCODERS:
        pre = (  # "at init": the same probe on the run's own architecture, randomly initialized from the seed
            [cell(encoder, "final_loss", 3), cell(encoder, "knn_top1"), cell(encoder, "knn_top1_random"),
             cell(encoder, "effective_rank")]
            if encoder in PRETRAIN
            else ["-", _cell(measured(encoder, "knn_top1") or []), "-", "-"]
        )  # fmt: skip
        down = [cell(f"{encoder}/{p}", "top1") for p in PROTOCOLS]
        print(f"| {encoder} | {' | '.join(pre)} | {' | '.join(down)} |")
    print("\n| pretraining run | " + " | ".join(f"feature cosine distance {s}" for s in STAGES) + " |")
    print("|---|" + "---|" * len(STAGES))
    for run in PRETRAIN:
        print(f"| {run} | " + " | ".join(cell(run, f"feature_cosine_distance_{s}", 3) for s in STAGES) + " |")
    print("\n| claim | measure | method | other | gap | separates (gap > 2 SD of both) |")
    print("|---|---|---|---|---|---|")
    for claim, method, other in CLAIMS:
        for measure in (*PROTOCOLS, "knn_top1", "effective_rank"):
            mine, theirs = measured(method, measure), measured(other, measure)
            if mine is None or theirs is None:
                continue
            (m, ms), (o, os_) = _stats(mine), _stats(theirs)
            verdict = "- (one seed)" if len(per_seed) < 2 else "yes" if abs(m - o) > 2 * max(ms, os_) else "no"
            row = f"| {claim} | {measure} | {m:.1f} ± {ms:.1f} | {o:.1f} ± {os_:.1f} | {m - o:+.1f} | {verdict} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
