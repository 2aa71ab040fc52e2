"""Launch a named config: ``python cluster/launch.py --config NAME [--local] [--dry-run] [key=value ...]``.

Without SLURM on the machine (a laptop, CI) the job runs locally with the same code. Re-running the same command
on the same run directory resumes the run.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from trainer.config import ConfigError, load_config
from trainer.local import run_local
from trainer.run_dir import prepare_run_dir

log = logging.getLogger("launch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config name in configs/ (e.g. huge_fcmae) or a YAML path")
    parser.add_argument("--nodes", type=int, help="nodes (cluster.nodes)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (cluster.gpus_per_node)")
    parser.add_argument("--partition", help="SLURM partition (cluster.partition)")
    parser.add_argument("--account", help="SLURM account (cluster.account)")
    parser.add_argument("--time", type=int, dest="time_min", help="time limit in minutes (cluster.time_min)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: runs/<config name>)")
    parser.add_argument("--local", action="store_true", help="run on this machine instead of submitting to SLURM")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and print the plan only")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.base_lr=3e-4")
    return parser.parse_args(argv)


def cluster_overrides(args: argparse.Namespace) -> list[str]:
    """Command-line flags as config overrides."""
    flags = {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "partition": args.partition,
        "account": args.account,
        "time_min": args.time_min,
    }
    return [f"cluster.{k}={v}" for k, v in flags.items() if v is not None]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, [*cluster_overrides(args), *args.overrides])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    run_dir = (args.run_dir or Path("runs") / cfg.name).resolve()
    print(f"# resolved config {cfg.name} (run dir {run_dir})\n{cfg.to_yaml()}", flush=True)
    if args.dry_run:
        return 0
    local = args.local or shutil.which("sbatch") is None
    if not args.local and local:
        log.info("no SLURM on this machine (sbatch not found): running locally")
    try:
        resumed = prepare_run_dir(cfg, run_dir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if resumed:
        log.info("run directory exists: resuming %s", run_dir)
    if not local:
        print("SLURM submission is not available in this version: pass --local", file=sys.stderr)
        return 2
    world_size = cfg.world_size() if cfg.cluster.gpus_per_node == 0 else cfg.cluster.gpus_per_node
    return run_local(run_dir, world_size)


if __name__ == "__main__":
    sys.exit(main())
