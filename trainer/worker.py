"""Entry point of one training process: ``python -m trainer.worker RUN_DIR``.

Reads the resolved ``RUN_DIR/config.yaml`` and runs its stage. The distributed environment comes from the
launcher (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) or from SLURM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainer.config import load_run_config


def setup_logging(rank: int) -> None:
    """Compact console logs on rank 0; warnings and errors only on the others."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(message)s" if rank else "%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "alembic", "mlflow", "urllib3", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(run_dir: Path) -> int:
    """Run the stage of the run directory's config; returns the exit code."""
    from trainer.pretrain import run_pretrain

    cfg = load_run_config(run_dir / "config.yaml")
    return run_pretrain(cfg, run_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    setup_logging(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    return run_stage(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
