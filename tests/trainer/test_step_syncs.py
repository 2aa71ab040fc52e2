"""The training step never waits for the device: no host read of a tensor in our step code.

A host read (``.item()``, ``bool(t)``, ``.tolist()``, ``.nonzero()``, ``float(t)``...) makes the CPU wait for the
GPU to finish everything queued. On a CPU machine nothing waits, so the test counts the reads themselves: every
call of those methods made directly from this project's code (``trainer/``, ``models/``, ``data/``) during a
:class:`trainer.step.OptimizerStep`. DeepSpeed's own reads inside ``engine.step()`` (its overflow check) are
DeepSpeed's.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]
OUR_CODE = tuple(str(REPO / d) + os.sep for d in ("trainer", "models", "data"))
READS = ("item", "tolist", "nonzero", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


@contextmanager
def count_host_reads() -> Iterator[Counter[str]]:
    """Count host reads of tensors made directly by this project's code while the context is open."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name: str) -> Callable[..., object]:
        original = originals[name]

        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OUR_CODE):
                counts[f"{name} at {Path(caller).relative_to(REPO)}:{sys._getframe(1).f_lineno}"] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _rank_main(rank: int, port: int, run_dir: str, zero_stage: int, out: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["DS_ACCELERATOR"] = "cpu"
    from tests.support.launch import TINY
    from trainer.config import load_config
    from trainer.step import micro_batch_groups
    from trainer.trainer import Trainer

    overrides = [*TINY, f"deepspeed.zero_stage={zero_stage}", "deepspeed.grad_accum=2", "data.batch_size=4"]
    cfg = load_config("demo_fcmae", [*overrides, "deepspeed.precision=bf16"])
    trainer = Trainer(cfg, Path(run_dir))
    groups = micro_batch_groups(trainer.stage.loader, 2, trainer.env.device)
    reads = []
    for step in range(3):
        group = next(groups)
        with count_host_reads() as counts:
            trainer.optimizer_step(group, step, 1e-4)
        reads.append(dict(counts))
    # The instrument works: the encoder without the visible count reads the mask to find it.
    images = group[0].images
    stage = trainer.stage
    mask = stage.model.random_mask(images)
    with count_host_reads() as control, torch.autocast("cpu", dtype=torch.bfloat16):
        stage.model.forward_encoder(images, mask)
    Path(out).write_text(json.dumps({"steps": reads, "control": dict(control)}))
    groups.close()
    trainer.close(failed=False)


@pytest.mark.parametrize("zero_stage", [1, 0])
def test_train_step_makes_no_host_read(zero_stage: int, tmp_path: Path) -> None:
    from trainer.rendezvous import free_port

    out = tmp_path / "reads.json"
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path / "run"), zero_stage, str(out)), nprocs=1, join=True)
    result = json.loads(out.read_text())
    assert result["control"], "the counter saw no read in code that reads the mask"
    for step, reads in enumerate(result["steps"]):
        if zero_stage == 0:
            # ZeRO-0 runs the client optimizer: one documented read per optimizer step decides the skip.
            assert list(reads) == [next(iter(reads))] and sum(reads.values()) == 1, (step, reads)
            assert "trainer/step.py" in next(iter(reads)), reads
        else:
            assert reads == {}, f"step {step}: host reads in the step: {reads}"
