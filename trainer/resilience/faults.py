"""Test-only fault injection: reach a phase of a run deterministically and fault it there. Off unless set.

``FCMAE_FAULT=<point>[@<step>]=<action>[@<rank>]`` in a rank's environment makes that rank (rank 0 unless given)
perform ``action`` the first time the run reaches ``point`` (at optimizer step ``step`` when given). The fault
matrix (``tests/faults/test_matrix.py``) drives every phase of a run this way instead of guessing timings; nothing
reads the variable when it is unset, and a value that does not parse is an error (a typo must not pass silently).

Points, in the order a run meets them:

- ``tracking``: the MLflow run created and its id written, before its parameters, config and inputs are logged;
- ``step``: after an optimizer step (and its ledger record), before logging and saving;
- ``save``: inside a checkpoint save, DeepSpeed's files of this rank written, its own state file not yet (nor the
  hashes, nor the ``COMPLETE`` marker);
- ``marker``: the marker written, before the ``latest`` pointer, retention and the mirror hand-off;
- ``mirror``: inside a background mirror upload, after its first file, before its marker;
- ``evaluation``: after the first batch of an evaluation (probes included);
- ``rollback``: a rollback recorded in ``rollbacks.jsonl``, before ``latest`` moves and the discarded checkpoints
  are removed;
- ``conversion``: the universal checkpoint converted (another world size), before it is marked and renamed;
- ``export``: the stage's weights written, before ``metrics.json``;
- ``publish``: the export's MLflow logged model created and the export's files uploaded, before its config, its
  status and its registration.

Actions: ``kill_rank`` (SIGKILL this rank), ``kill_launcher`` (SIGKILL the local launcher), ``term_launcher``,
``hup_launcher``, ``int_launcher`` (SIGTERM / SIGHUP / SIGINT to the launcher), ``preempt`` (SIGUSR2 to the
launcher, SLURM's warning), ``fill_disk`` (fill the file system of the run directory with
``<run_dir>/../fault_ballast``, so the next write fails with ENOSPC; delete the file to recover).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "FCMAE_FAULT"
POINTS = ("tracking", "step", "save", "marker", "mirror", "evaluation", "rollback", "conversion", "export", "publish")
SIGNAL_ACTIONS = {
    "kill_launcher": signal.SIGKILL,
    "term_launcher": signal.SIGTERM,
    "hup_launcher": signal.SIGHUP,
    "int_launcher": signal.SIGINT,
    "preempt": signal.SIGUSR2,
}
ACTIONS = ("kill_rank", "fill_disk", *SIGNAL_ACTIONS)
BALLAST = "fault_ballast"
_SPEC = re.compile(r"^(?P<point>[a-z]+)(@(?P<step>\d+))?=(?P<action>[a-z_]+)(@(?P<rank>\d+))?$")


@dataclass(frozen=True)
class Fault:
    """One parsed ``FCMAE_FAULT``."""

    point: str
    step: int | None
    action: str
    rank: int


def parse(spec: str) -> Fault:
    """``point[@step]=action[@rank]`` -> :class:`Fault`; a ValueError names what is wrong."""
    match = _SPEC.match(spec.strip())
    if match is None or match["point"] not in POINTS or match["action"] not in ACTIONS:
        raise ValueError(
            f"{ENV}={spec!r}: expected <point>[@<step>]=<action>[@<rank>] with a point of {', '.join(POINTS)} "
            f"and an action of {', '.join(ACTIONS)}"
        )
    step = None if match["step"] is None else int(match["step"])
    return Fault(match["point"], step, match["action"], int(match["rank"] or 0))


_fired = False


def at(point: str, step: int | None = None, run_dir: Path | None = None) -> None:
    """Perform the configured fault if this is its point (and step, and rank); once per process."""
    global _fired
    spec = os.environ.get(ENV)
    if not spec or _fired:
        return
    fault = parse(spec)
    rank = int(os.environ.get("RANK", "0"))
    if fault.point != point or fault.rank != rank or (fault.step is not None and fault.step != step):
        return
    _fired = True
    log.warning("fault injection: %s at %s%s (rank %d)", fault.action, point, "" if step is None else f"@{step}", rank)
    if fault.action == "kill_rank":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "fill_disk":
        if run_dir is None:
            raise ValueError(f"{ENV}: fill_disk needs a point that knows the run directory, not {point}")
        fill_disk(run_dir.resolve().parent / BALLAST)
    else:
        from trainer.resilience.preemption import PreemptionHandler

        os.kill(os.getppid(), SIGNAL_ACTIONS[fault.action])
        # The launcher forwards the signal (or, killed, the parent-death signal arrives): wait until this rank has
        # it, so the phase that follows sees the signal as a real one arriving here would.
        deadline = time.monotonic() + 10
        while PreemptionHandler.last_received is None and time.monotonic() < deadline:
            time.sleep(0.02)


def fill_disk(path: Path) -> None:
    """Write zeros to ``path`` until its file system has no byte left (the ENOSPC is expected and swallowed)."""
    size = 1 << 20
    with open(path, "wb", buffering=0) as f:
        while size >= 1:
            try:
                while f.write(bytes(size)) == size:
                    pass
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
            size //= 16
