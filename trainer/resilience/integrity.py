"""Sizes and sha256 digests of a checkpoint's files: recorded in its ``COMPLETE`` marker, checked before a resume.

The work is split over the ranks (file ``i`` of the sorted list is hashed by rank ``i % world_size``), so a large
checkpoint on a shared file system is hashed in parallel; the ranks then combine what they found.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(directory: Path, exclude: set[str]) -> list[str]:
    """The files of a checkpoint directory (relative POSIX paths, sorted), without the names in ``exclude``."""
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name not in exclude
    )


def digest_share(directory: Path, files: list[str], rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """``{file: {"bytes": size, "sha256": hex}}`` for this rank's share of ``files``."""
    return {
        name: {"bytes": (directory / name).stat().st_size, "sha256": sha256_file(directory / name)}
        for name in files[rank::world_size]
    }


def check_share(directory: Path, recorded: dict[str, dict[str, Any]], rank: int, world_size: int) -> list[str]:
    """What is wrong with this rank's share of the recorded files: missing, another size, other bytes."""
    problems = []
    for name in sorted(recorded)[rank::world_size]:
        path, want = directory / name, recorded[name]
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != int(want["bytes"]):
            problems.append(f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{name} does not match its sha256 (changed bytes)")
    return problems
