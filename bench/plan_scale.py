"""Epoch plans at web scale: what one rank's loader pays to plan its share of a 2-billion-sample set.

A simulated set (200,000 shards of 10,000 samples, nothing but the sample counts, as a manifest gives them) is
planned for the last rank of 1024 with 8 dataloader workers (each worker plans its share and locates its samples in
the shards, as :class:`data.loader._WorkerStream` does), then for the last rank of 960 after a mid-epoch resume from
1024 ranks (the consumed slots of the earlier layout are removed first), and for the last rank of 1024 when the set
is a weighted mixture of three sources (weights 0.5, 0.3, 0.2, the shards dealt round robin). Each case runs in its
own process, under an address-space limit, for the current :mod:`data.sampling` and for the one of a git revision
(``--baseline-rev``, the explicit-array plans), side by side; it prints the peak traced memory and the wall time per
rank.

    python -m bench.plan_scale                                   # full scale, baseline at 1/100 and 1/10
    python -m bench.plan_scale --shards 2000 --baseline-scales 1  # 1/100, both at the same scale
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import ModuleType

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]


def load_sampling(rev: str | None) -> ModuleType:
    """:mod:`data.sampling` as it is, or as it was at git revision ``rev``."""
    if rev is None:
        import data.sampling

        return data.sampling
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:data/sampling.py"], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "sampling_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sampling_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sampling_baseline"] = module
    spec.loader.exec_module(module)
    return module


MIXTURE = (0.5, 0.3, 0.2)


def plan_rank(
    sampling: ModuleType, shards: int, per_shard: int, world: int, resume_from: int | None, mixture: bool
) -> dict:
    """Plan the last rank's shares (8 workers) of epoch 0; with ``resume_from``, after that many ranks consumed a
    tenth of the epoch; with ``mixture``, of a three-source mixture. Returns the peak traced memory, the wall time and
    the slots planned."""
    workers, batch, window = 8, 32, 1024
    tracemalloc.start()
    started = time.perf_counter()
    sizes = [per_shard] * shards
    if mixture:
        owner = [i % len(MIXTURE) for i in range(shards)]
        order = sampling.MixtureOrder(sizes, owner, MIXTURE, 1, 0, True)
    else:
        order = sampling.EpochOrder(sizes, 1, 0, True)
    history = []
    if resume_from is not None:
        earlier = sampling.Layout(resume_from, workers, batch, "drop", window)
        history.append(sampling.Segment(earlier, earlier.batches(order.total) // 10))
    pool = sampling.remaining_pool(order.total, history, seed=1, epoch=0)
    layout = sampling.Layout(world, workers, batch, "drop", window)
    slots = 0
    for w in range(workers):
        share = sampling.worker_share(pool, layout, world - 1, w, seed=1, epoch=0, segment=len(history))
        located, _ = order.locate(share.positions)
        slots += len(located)
        del share, located
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"peak_bytes": peak, "seconds": seconds, "slots": slots, "samples": order.total}


def _child(args: argparse.Namespace) -> None:
    limit = int(args.limit_gib * GiB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        sampling = load_sampling(args.rev)
        result = plan_rank(sampling, args.shards, args.per_shard, args.world, args.resume_from, args.mixture)
    except MemoryError:
        result = {"error": f"MemoryError under a {args.limit_gib:g} GiB address-space limit"}
    print(json.dumps(result))


def run_case(rev: str | None, shards: int, per_shard: int, world: int, resume_from: int | None, mixture: bool,
             limit_gib: float) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "bench.plan_scale", "--child", "--shards", str(shards), "--per-shard",
           str(per_shard), "--world", str(world), "--limit-gib", str(limit_gib)]  # fmt: skip
    if rev is not None:
        cmd += ["--rev", rev]
    if resume_from is not None:
        cmd += ["--resume-from", str(resume_from)]
    if mixture:
        cmd.append("--mixture")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=200_000)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--baseline-rev", default="4aebe9a", help="git revision of the explicit-array plans")
    parser.add_argument(
        "--baseline-scales", type=float, nargs="+", default=[0.01, 0.1],
        help="fractions of --shards the baseline is also run at (it cannot hold the full scale)",
    )  # fmt: skip
    parser.add_argument("--limit-gib", type=float, default=12.0, help="address-space limit of each case's process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rev", help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--resume-from", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mixture", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, python {platform.python_version()}; "
          f"8 workers, batch 32, window 1024; address-space limit {args.limit_gib:g} GiB per case")  # fmt: skip
    print("| code | samples | case | peak memory per rank | time per rank | slots planned |")
    print("|---|---|---|---|---|---|")
    cases = [("epoch for rank 1023 of 1024", 1024, None, False), ("resume 1024 -> 960, rank 959", 960, 1024, False),
             ("mixture of 3, rank 1023 of 1024", 1024, None, True)]  # fmt: skip
    runs = [(None, args.shards)] + [(args.baseline_rev, int(args.shards * f)) for f in args.baseline_scales]
    runs.append((args.baseline_rev, args.shards))
    for rev, shards in runs:
        for name, world, resume_from, mixture in cases:
            result = run_case(rev, shards, args.per_shard, world, resume_from, mixture, args.limit_gib)
            code = "current" if rev is None else f"baseline {rev}"
            samples = f"{shards * args.per_shard / 1e9:g}B"
            if "error" in result:
                print(f"| {code} | {samples} | {name} | {result['error']} | - | - |", flush=True)
                continue
            memory = f"{result['peak_bytes'] / GiB:.3f} GiB"
            print(f"| {code} | {samples} | {name} | {memory} | {result['seconds']:.1f} s | {result['slots']:,} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
