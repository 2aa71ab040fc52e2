"""Atomic, resumable checkpoints on top of DeepSpeed's.

Layout of ``<run_dir>/checkpoints``::

    step_00001000/           DeepSpeed's files (model, optimizer shards) for that step
        rank_00000.pt        our per-rank state: step, loader state, RNG (one file per rank)
        COMPLETE             written by rank 0 after every rank finished: JSON with step, world size and every
                             file's size and sha256 (hashed by all ranks in parallel)
    latest                   name of the newest complete checkpoint, replaced atomically after COMPLETE
    damaged_step_00000900/   a checkpoint refused at resume (kept for inspection, never loaded; a step damaged
                             again is kept as damaged_step_00000900.2, .3, ...)

A checkpoint counts only when ``COMPLETE`` exists and parses as a checkpoint record, so a crash mid-save (even
SIGKILL) never leaves one that resume would pick; leftovers of an interrupted save are removed at the next save.
A save that fails for want of disk space removes its partial files and fails the run with the bytes it needs;
the previous checkpoint stays the newest complete one.

Rollbacks (:mod:`trainer.resilience.recovery`) abandon the checkpoints after the one they restore. Each marker
records the run's *timeline* (how many rollbacks were made when it was written); rollback ``i`` (0-based, in
``rollbacks.jsonl``) restored step ``S_i``, so a checkpoint of timeline ``t`` is abandoned when some rollback
``i >= t`` restored a step before it. That rule holds from the moment the rollback is recorded, so a crash before
``latest`` moves or the abandoned directories are deleted (locally and on the mirror) never resumes one of them.

Before a resume every rank checks its share of the files against the marker: a truncated or changed checkpoint is
refused with a log line, renamed ``damaged_*`` and the previous complete one is used. The last ``keep`` complete
checkpoints are kept. With ``mirror_url`` each complete checkpoint is copied to that fsspec URL in the background
(:mod:`trainer.resilience.mirror`, marker last), and resume falls back to the mirror's newest intact copy when the local
directory has none. State files load with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from trainer.config import CheckpointConfig
from trainer.distributed import DistEnv, barrier, gather_lists, gather_objects
from trainer.export import atomic_write_text
from trainer.resilience import faults
from trainer.resilience.failure import DiskFullError, disk_full
from trainer.resilience.integrity import check_share, checkpoint_files, digest_share
from trainer.resilience.mirror import MirrorUploader
from trainer.run_dir import LATEST, MARKER

log = logging.getLogger(__name__)

UNIVERSAL_SUFFIX = "_universal"
DAMAGED_PREFIX = "damaged_"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on local disk."""

    tag: str
    step: int
    world_size: int
    path: Path
    zero_stage: int | None = None
    """ZeRO stage of the run that wrote it (None: a checkpoint from before the marker recorded it)."""
    timeline: int = 0
    """Rollbacks made before it was written (see the module docstring)."""


def _info(tag: str, meta: dict[str, Any], path: Path) -> CheckpointInfo:
    stage = meta.get("zero_stage")
    return CheckpointInfo(
        tag, int(meta["step"]), int(meta["world_size"]), path, None if stage is None else int(stage),
        int(meta.get("timeline", 0)),
    )  # fmt: skip


SAVE_WINDOW_FRACTION = 0.8
"""A save and its mirror upload must fit in this share of the preemption warning window (``cluster.signal_delay_s``):
the rest is left for the step in flight and the exit."""


def fits_save_window(seconds: float, window_s: float) -> bool:
    """Whether a save taking ``seconds`` fits the preemption warning window (the planner and the run both ask)."""
    return seconds <= SAVE_WINDOW_FRACTION * window_s


def checkpoint_bytes(num_params: int, precision: str, zero_stage: int) -> int:
    """Expected size of a DeepSpeed checkpoint: the weights in the training precision, fp32 master weights (kept by
    ZeRO's optimizers and by bf16/fp16 training) and AdamW's two fp32 moments; per-rank state files are small."""
    weights = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" and zero_stage == 0 else 4
    return num_params * (weights + master + 8)


def step_tag(step: int) -> str:
    """Directory name of the checkpoint after optimizer step ``step``."""
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    key = state["numpy"]["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy"]["pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _read_marker(directory: Path) -> dict[str, Any] | None:
    """The marker's record, or None when the directory is not a complete checkpoint: no marker, or one that does not
    parse as a checkpoint record (``null``, ``{}``, a step that is not a number...), which is logged."""
    marker = directory / MARKER
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"it holds a {type(meta).__name__}, not a record")
        int(meta["step"]), int(meta["world_size"]), int(meta.get("timeline", 0))
        if not isinstance(meta.get("files", {}), dict):
            raise ValueError("its files entry is not a record")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("%s is not a checkpoint record (%s: %s): the directory is not used", marker,
                    type(err).__name__, err)  # fmt: skip
        return None


def _free_name(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``, ... : the first name not taken."""
    n, candidate = 1, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _delete(directory: Path, ignore_errors: bool = True) -> None:
    """Delete a checkpoint directory, its marker first: a deletion cut short leaves no directory a resume picks."""
    (directory / MARKER).unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=ignore_errors)


class Checkpointer:
    """Saves and finds complete checkpoints; every rank calls :meth:`save` and :meth:`load`."""

    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        env: DistEnv,
        rollback_targets: Sequence[int] = (),
        window_s: float | None = None,
    ) -> None:
        self.root = root
        self.cfg = cfg
        self.env = env
        self.window_s = window_s
        """The preemption warning window saves must fit in (``cluster.signal_delay_s``; None: not checked)."""
        self.last_save_time = time.monotonic()
        self.rollback_targets = list(rollback_targets)
        """The step each recorded rollback restored, in order (``rollbacks.jsonl``); see the module docstring."""
        self.last_save_s: float | None = None
        """Wall time of the last save (all ranks' files, hashes and marker)."""
        self.uploader = MirrorUploader(cfg.mirror_url, cfg.mirror_queue) if cfg.mirror_url and env.is_main else None
        root.mkdir(parents=True, exist_ok=True)

    # -- when to save ------------------------------------------------------------------------------------------
    def clock_due(self) -> bool:
        """Rank 0's clock says ``checkpoint.every_minutes`` passed since the last save; the ranks agree on it in the
        step's preemption poll (:meth:`trainer.resilience.preemption.PreemptionHandler.poll`)."""
        minutes = self.cfg.every_minutes
        return minutes is not None and self.env.is_main and time.monotonic() - self.last_save_time >= 60 * minutes

    def due(self, step: int, total: int, requested: bool) -> bool:
        """Whether to save after ``step``: every ``checkpoint.every_steps``, at the last step, or when the ranks
        agreed on a request (a preemption, or :meth:`clock_due`)."""
        return requested or step % self.cfg.every_steps == 0 or step == total

    def check_window(self, seconds: float, how: str) -> None:
        """Warn (rank 0) when a save, and the mirror upload after it, would not fit in the preemption window."""
        window = self.window_s
        if window is None or not self.env.is_main or fits_save_window(seconds, window):
            return
        log.warning(
            "a checkpoint save%s takes %.0fs (%s), more than %d%% of the %ds preemption warning window "
            "(cluster.signal_delay_s): a preemption may kill it; raise cluster.signal_delay_s, save to faster "
            "storage, or lower checkpoint.write_mb_per_s's estimate to match",
            " and its mirror upload" if self.cfg.mirror_url else "", seconds, how, 100 * SAVE_WINDOW_FRACTION,
            window,
        )  # fmt: skip

    def check_estimated_window(self, num_params: int, precision: str, zero_stage: int) -> None:
        """:meth:`check_window` before any save was measured: the checkpoint's size over
        ``checkpoint.write_mb_per_s``."""
        size = checkpoint_bytes(num_params, precision, zero_stage)
        self.check_window(size / (self.cfg.write_mb_per_s * 1e6), "estimated")

    # -- finding ---------------------------------------------------------------------------------------------
    @property
    def timeline(self) -> int:
        """The timeline new checkpoints are written in: the rollbacks made so far."""
        return len(self.rollback_targets)

    def abandoned(self, info: CheckpointInfo) -> bool:
        """Whether a rollback made after ``info`` was written restored a step before it."""
        return any(target < info.step for target in self.rollback_targets[info.timeline :])

    def _all_complete(self) -> list[CheckpointInfo]:
        found = []
        for directory in self.root.iterdir() if self.root.is_dir() else []:
            if not directory.is_dir() or not directory.name.startswith("step_"):
                continue
            if directory.name.endswith(UNIVERSAL_SUFFIX):
                continue
            meta = _read_marker(directory)
            if meta is not None:
                found.append(_info(directory.name, meta, directory))
        return sorted(found, key=lambda c: c.step)

    def complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints that no rollback abandoned, oldest first (by the step recorded in their markers,
        not by file names)."""
        return [c for c in self._all_complete() if not self.abandoned(c)]

    def remove_abandoned(self) -> list[str]:
        """Rank 0: delete the checkpoints rollbacks abandoned, here and on the mirror; returns their names."""
        gone = [c for c in self._all_complete() if self.abandoned(c)]
        for info in gone:
            _delete(info.path)
            shutil.rmtree(self.root / (info.tag + UNIVERSAL_SUFFIX), ignore_errors=True)
        if gone:
            log.warning("removed %s: abandoned by a rollback", ", ".join(c.tag for c in gone))
        if self.uploader is not None and gone:
            self.uploader.remove([c.tag for c in gone])
        return [c.tag for c in gone]

    def rolled_back(self, target: CheckpointInfo) -> None:
        """Collective, after the rollback to ``target`` was recorded: every later checkpoint is abandoned from now
        on; rank 0 points ``latest`` at ``target`` and deletes them."""
        self.rollback_targets.append(target.step)
        if self.env.is_main:
            atomic_write_text(self.root / LATEST, target.tag)
            self.remove_abandoned()
        barrier()

    def find_latest(self) -> CheckpointInfo | None:
        """The checkpoint to resume from (collective): the ``latest`` pointer if it names a complete one, else the
        newest complete one, else one fetched from the mirror; None for a fresh run. Each candidate is verified
        first; a damaged one is set aside and the previous complete one tried. Checkpoints a rollback abandoned
        are deleted first (a crash may have left them)."""
        if self.env.is_main:
            self.remove_abandoned()
        barrier()  # the other ranks list the directory after rank 0 cleaned it
        while True:
            candidate = self._newest_local()
            if candidate is None:
                return self._fetch_from_mirror() if self.cfg.mirror_url else None
            problems = self.verify(candidate)
            if not problems:
                return candidate
            if self.env.is_main:
                log.error(
                    "checkpoint %s is damaged (%s); it is kept as %s%s and the previous complete checkpoint is used",
                    candidate.tag, "; ".join(problems), DAMAGED_PREFIX, candidate.tag,
                )  # fmt: skip
                os.replace(candidate.path, _free_name(self.root / f"{DAMAGED_PREFIX}{candidate.tag}"))
                if (self.root / LATEST).is_file() and (self.root / LATEST).read_text().strip() == candidate.tag:
                    (self.root / LATEST).unlink()
            barrier()

    def _newest_local(self) -> CheckpointInfo | None:
        pointer = self.root / LATEST
        if pointer.is_file():
            tag = pointer.read_text().strip()
            meta = _read_marker(self.root / tag) if tag.startswith("step_") else None
            if meta is not None and not self.abandoned(_info(tag, meta, self.root / tag)):
                return _info(tag, meta, self.root / tag)
            log.warning("checkpoint pointer names %s, which is not complete; using the newest complete one", tag)
        complete = self.complete()
        return complete[-1] if complete else None

    def verify(self, info: CheckpointInfo) -> list[str]:
        """Collective: what is wrong with ``info``'s files against the sizes and sha256 its marker recorded, each
        rank checking its share; the same list on every rank. Markers written before hashes were recorded have
        nothing to check against."""
        recorded = (_read_marker(info.path) or {}).get("files")
        if not recorded:
            return []
        mine = check_share(info.path, recorded, self.env.rank, self.env.world_size)
        return sorted(gather_lists(mine))

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, rank_state: dict[str, Any]) -> CheckpointInfo:
        """All ranks: DeepSpeed save, per-rank state, then (rank 0) marker, pointer, retention and mirror. A step
        already saved in this timeline (a save repeated at the same step: an evaluation stopped twice) is kept as
        it is; a directory of the step that is partial or abandoned is replaced."""
        tag = step_tag(step)
        directory = self.root / tag
        existing = _read_marker(directory) if directory.exists() else None
        if existing is not None and not self.abandoned(_info(tag, existing, directory)):
            if self.env.is_main:
                log.info("checkpoint %s is already saved", directory)
            self.last_save_time = time.monotonic()
            return _info(tag, existing, directory)
        if self.env.is_main and directory.exists():
            _delete(directory, ignore_errors=False)  # leftovers of an interrupted save of this step, or abandoned
        barrier()
        started = time.perf_counter()
        try:
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
            faults.at("save", step, self.root.parent)
            state = {"step": step, "rng": rng_state(), **rank_state}
            tmp = directory / f".rank_{self.env.rank:05d}.pt.tmp"
            torch.save(state, tmp)
            os.replace(tmp, directory / f"rank_{self.env.rank:05d}.pt")
        except Exception as err:
            self._fail_if_disk_full(err, directory)
            raise
        barrier()
        files = checkpoint_files(directory, {MARKER})
        digests = {
            k: v
            for share in gather_objects(digest_share(directory, files, self.env.rank, self.env.world_size))
            for k, v in share.items()
        }
        zero_stage = int(engine.zero_optimization_stage())
        info = CheckpointInfo(tag, step, self.env.world_size, directory, zero_stage, self.timeline)
        if self.env.is_main:
            marker = {
                "step": step,
                "world_size": self.env.world_size,
                "zero_stage": zero_stage,
                "timeline": self.timeline,
                "time": time.time(),
                "files": digests,
            }
            try:
                atomic_write_text(directory / MARKER, json.dumps(marker))
                faults.at("marker", step, self.root.parent)
                atomic_write_text(self.root / LATEST, tag)
            except Exception as err:
                self._fail_if_disk_full(err, directory)
                raise
            if self.uploader is not None:
                self.uploader.submit(directory)
            self._retain()
        barrier()
        self.last_save_s = time.perf_counter() - started
        self.last_save_time = time.monotonic()
        if self.env.is_main:
            size = sum(int(d["bytes"]) for d in digests.values())
            log.info("checkpoint %s saved in %.1fs (%.0f MB)", directory, self.last_save_s, size / 1e6)
        upload = self.uploader.done[-1].seconds if self.uploader and self.uploader.done else 0.0
        self.check_window(self.last_save_s + upload, "measured")
        return info

    def _fail_if_disk_full(self, err: BaseException, directory: Path) -> None:
        """A save that ran out of space: delete its partial directory (nothing resumes it, and the space is needed)
        and raise :class:`~trainer.resilience.failure.DiskFullError` with the bytes a checkpoint takes; other errors
        pass."""
        if not disk_full(err, self.root):
            return
        _delete(directory)
        previous = self.complete()
        newest = previous[-1] if previous else None
        files = (_read_marker(newest.path) or {}).get("files", {}) if newest else {}
        need = sum(int(d["bytes"]) for d in files.values())
        free = shutil.disk_usage(self.root).free
        raise DiskFullError(
            f"no space left on the device of {self.root} while saving {directory.name}"
            + (f": a checkpoint takes {need / 1e6:.0f} MB" if need else "")
            + f", {free / 1e6:.0f} MB are free after removing the partial save. Free space there (or move the run "
            f"directory) and re-run the same command; the newest complete checkpoint "
            f"({newest.tag if newest else 'none'}) is intact."
        ) from err

    def finish_uploads(self, seconds_left: float | None, timeout_s: float) -> str | None:
        """Rank 0: let the background mirror upload finish, within what is left of the preemption window (minus a
        10 s margin to exit) when ``seconds_left`` is given, else within ``timeout_s`` (the end of the run); returns
        what the mirror was left without (a checkpoint's tag, or "failed"), None when it is complete."""
        if self.uploader is None:
            return None
        if seconds_left is not None:
            timeout_s = max(0.0, seconds_left - 10.0)
        if self._wait_for_uploads(timeout_s):
            return None
        return self.uploader.busy() or "failed"

    def _wait_for_uploads(self, timeout_s: float | None) -> bool:
        """Rank 0: let the background upload finish within ``timeout_s``; False (and a log line naming what the
        mirror lacks) when it does not. True on other ranks and without a mirror."""
        if self.uploader is None:
            return True
        pending = self.uploader.busy()
        if pending is None or self.uploader.wait(timeout_s):
            return pending not in {tag for tag, _ in self.uploader.failed}
        log.error(
            "mirror upload of %s to %s did not finish in %.0fs: that copy has no %s marker, so a resume from the "
            "mirror uses the newest complete one before it",
            pending, self.cfg.mirror_url, timeout_s or 0.0, MARKER,
        )  # fmt: skip
        return False

    def _retain(self) -> None:
        complete = self.complete()
        keep = {c.tag for c in complete[-self.cfg.keep :]}
        if self.uploader is not None:
            keep |= self.uploader.in_use()  # still to be read by the background upload
        newest = complete[-1].step if complete else -1
        for directory in self.root.iterdir():
            if not directory.is_dir():
                continue
            name = directory.name.removesuffix(UNIVERSAL_SUFFIX)
            if name.startswith(DAMAGED_PREFIX):
                continue  # set aside at a resume: for the user to inspect
            meta = _read_marker(self.root / name)
            stale_partial = meta is None and name.startswith("step_") and int(name[5:] or -1) < newest
            if (meta is not None and name not in keep) or stale_partial:
                shutil.rmtree(directory, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self, engine: Any, info: CheckpointInfo, load_universal: bool) -> dict[str, Any]:
        """Load DeepSpeed state (universal when the world size changed) and this rank's state file."""
        tag = info.tag + UNIVERSAL_SUFFIX if load_universal else info.tag
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        own = info.path / f"rank_{self.env.rank:05d}.pt"
        source = own if own.exists() else info.path / "rank_00000.pt"
        state = dict(torch.load(source, map_location="cpu", weights_only=True))
        if info.world_size == self.env.world_size:
            set_rng_state(state["rng"])
        # On another world size, per-rank RNG streams do not map; every draw that shapes training is derived
        # from (seed, step, rank) anyway, so nothing is lost.
        return state

    def prepare_universal(self, info: CheckpointInfo | None, timeout_s: float) -> bool:
        """Whether ``info`` loads from DeepSpeed's universal format on this world size, converting it first (once)
        when it does: a checkpoint of another world size, unless written under ZeRO-0, which keeps whole weights
        and optimizer state in one file that loads on any world size as it is.

        Rank 0 converts into a temporary directory, marks it complete and renames it into place, so a retry reuses
        a finished conversion and never sees half of one. The other ranks wait for the marker on the file system,
        not in a collective, so a long conversion cannot run out the process group's timeout.
        """
        if info is None or info.world_size == self.env.world_size or info.zero_stage == 0:
            return False
        out = self.root / (info.tag + UNIVERSAL_SUFFIX)
        if (out / MARKER).exists():
            return True
        if self.env.is_main:
            log.warning(
                "checkpoint %s was written by %d ranks, this job has %d: converting it to a universal checkpoint",
                info.tag, info.world_size, self.env.world_size,
            )  # fmt: skip
            tmp = self.root / f".{out.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            cmd = [
                sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(info.path),
                "--output_folder", str(tmp), "--inject_missing_state",
            ]  # fmt: skip
            started = time.perf_counter()
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"ds_to_universal failed on {info.path}:\n{result.stderr[-3000:]}")
            faults.at("conversion", info.step, self.root.parent)
            atomic_write_text(tmp / MARKER, json.dumps({"step": info.step, "world_size": info.world_size}))
            os.replace(tmp, out)
            log.info("universal checkpoint %s written in %.1fs", out, time.perf_counter() - started)
            return True
        deadline = time.monotonic() + timeout_s
        while not (out / MARKER).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"rank 0 did not finish converting {info.path} to {out} within {timeout_s:.0f}s "
                    "(watchdog.phase_timeout_s); see rank 0's log"
                )
            time.sleep(1.0)
        return True

    # -- mirror ----------------------------------------------------------------------------------------------
    def _fetch_from_mirror(self) -> CheckpointInfo | None:
        """Rank 0 fetches the mirror's newest checkpoint whose copy is intact (marker present, files as recorded),
        setting damaged copies aside in the log; every rank then uses what rank 0 fetched."""
        tag = self._fetch_intact_copy() if self.env.is_main else None
        tag = gather_objects(tag)[0]
        if tag is None:
            return None
        meta = _read_marker(self.root / tag)
        if meta is None:
            raise RuntimeError(f"fetched checkpoint {tag} from {self.cfg.mirror_url} is incomplete")
        return _info(tag, meta, self.root / tag)

    def _fetch_intact_copy(self) -> str | None:
        from data.storage import url_to_fs

        assert self.cfg.mirror_url is not None
        fs, base = url_to_fs(self.cfg.mirror_url)
        base = base.rstrip("/")
        if not fs.exists(base):
            return None
        steps = []
        for entry in fs.ls(base, detail=False):
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("step_") and fs.exists(f"{base}/{name}/{MARKER}"):
                steps.append(name)
        for tag in sorted(steps, reverse=True):
            try:
                remote = json.loads(fs.cat_file(f"{base}/{tag}/{MARKER}"))
                if self.abandoned(_info(tag, remote, self.root / tag)):
                    log.warning("mirror copy of %s was abandoned by a rollback: skipping it", tag)
                    continue
            except (ValueError, KeyError, TypeError, OSError):
                pass  # checked again, with its files, once fetched
            staging = self.root / f".fetch_{tag}"
            shutil.rmtree(staging, ignore_errors=True)
            fs.get(f"{base}/{tag}/", str(staging) + "/", recursive=True)
            meta = _read_marker(staging) or {}
            problems = check_share(staging, meta.get("files") or {}, 0, 1)
            if problems:
                log.error(
                    "mirror copy of %s is damaged (%s): trying the previous one", tag, "; ".join(problems)
                )  # fmt: skip
                shutil.rmtree(staging, ignore_errors=True)
                continue
            os.replace(staging, self.root / tag)
            atomic_write_text(self.root / LATEST, tag)
            log.warning("resuming from the mirror: fetched %s from %s", tag, self.cfg.mirror_url)
            return tag
        return None
