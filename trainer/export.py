"""Files others read while we may crash: stage exports (fp32 weights, ``metrics.json``) and small state files
(checkpoint markers, the ``latest`` pointer, the run's ``config.yaml``), each written atomically.

The next stage, users and the "run already complete" check read these files, so a crash in the middle of an export
must leave the previous file or none, never half of one: every file is written beside its target and renamed into
place. ``metrics.json`` is written last by every stage; its presence means the export is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` beside ``path``, flush it to disk, then rename it into place (the one atomic text writer)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: the half-written file must not take the space
        raise


def write_weights(path: Path, state: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """An fp32 CPU copy of ``state`` as safetensors at ``path``."""
    from safetensors.torch import save_file  # here: the launcher writes state files without importing torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_metrics(out_dir: Path, summary: dict[str, Any]) -> None:
    """``out_dir/metrics.json`` (the stage's final metrics; written after its weights)."""
    from trainer.resilience import faults

    out_dir.mkdir(parents=True, exist_ok=True)
    faults.at("export", None, out_dir.parent)
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2))
