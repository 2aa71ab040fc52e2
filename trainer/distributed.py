"""Process-group set-up from torchrun-style or SLURM environment variables, and the few collectives we need."""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from trainer.rendezvous import free_port


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, tracks and exports."""
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if name in os.environ:
            return int(os.environ[name])
    return default


NCCL_FAIL_FAST = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    "TORCH_NCCL_ENABLE_MONITORING": "1",
}


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Initialize torch.distributed (NCCL on GPUs, gloo on CPU) through DeepSpeed, from the environment.

    Reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun, our local launcher) or falls back to SLURM's
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; ``MASTER_ADDR``/``MASTER_PORT`` must be set.
    """
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise RuntimeError("MASTER_PORT is not set: launch through cluster/launch.py (or torchrun)")
        os.environ["MASTER_PORT"] = str(free_port())
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(local_rank)
        # A hung or failed NCCL collective raises (and tears the communicator down) instead of blocking forever,
        # and its flight recorder keeps the last collectives of every rank for the dump on timeout.
        for key, value in NCCL_FAIL_FAST.items():
            os.environ.setdefault(key, value)
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=False,
        )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank (an all-reduce MAX)."""
    return any_ranks([flag], device)[0]


def any_ranks(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag, true on every rank if it is true on any rank: one all-reduce MAX for all of them."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), on every rank, in rank order; for rare events (rollbacks, checksums)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_lists(items: list[Any]) -> list[Any]:
    """Every rank's list (picklable items) concatenated in rank order, on every rank."""
    return [item for share in gather_objects(items) for item in share]


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (the same count on every rank: evaluation loaders pad), concatenated in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return rows
    out = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(out, rows.contiguous())
    return torch.cat(out)


def mean_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Average a few scalars over ranks (for logging)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def barrier() -> None:
    """A barrier when distributed, a no-op otherwise."""
    if dist.is_initialized():
        dist.barrier()


def teardown(engine: object | None = None, clean: bool = True) -> None:
    """Explicit shutdown: destroying the engine and the group avoids gloo aborts at interpreter exit. After an
    error (``clean=False``) nothing waits for the other ranks, which may be dead or stuck: the group is only
    destroyed locally."""
    if not clean:
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
