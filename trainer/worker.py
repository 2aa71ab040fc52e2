"""Entry point of one training process: ``python -m trainer.worker RUN_DIR``.

Reads the resolved ``RUN_DIR/config.yaml`` and runs its stage. The distributed environment comes from the
launcher (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) or from SLURM.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from trainer.config import load_run_config
from trainer.resilience.failure import FAILURE_EXIT_CODE, hard_exit, leave, record_exception
from trainer.resilience.preemption import stop_with_launcher
from trainer.run_dir import RunDir
from trainer.trainer import train


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


def run_run_dir(run_dir: Path) -> int:
    """Run the stage of the run directory's config; returns the exit code."""
    return train(load_run_config(RunDir(run_dir).config), run_dir)


def run_rank(run_dir: Path, rank: int) -> int:
    """Run this rank; an exception is recorded (``failures/``) and ends the process at once with a non-zero code
    (:func:`trainer.resilience.failure.hard_exit`): a failed rank never waits on its peers."""
    # Where NCCL's flight recorder dumps the last collectives when one times out.
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", str(RunDir(run_dir).hangs / "nccl_trace_rank_"))
    try:
        return run_run_dir(run_dir)
    except BaseException as err:  # every error ends the rank, KeyboardInterrupt included
        record_exception(run_dir, rank, err)
        hard_exit(FAILURE_EXIT_CODE)
        raise  # unreachable: hard_exit does not return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    stop_with_launcher()  # first: a launcher killed from now on stops this rank
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    setup_logging(rank)
    return run_rank(args.run_dir, rank)


if __name__ == "__main__":
    leave(main())
