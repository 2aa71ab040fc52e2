"""Step watchdog: a rank that stops making progress (a peer died inside a collective, a node hangs, a deadlock)
dumps every thread's stack into the run directory and exits, instead of holding the allocation until the job's
time limit.

The loop calls :meth:`StepWatchdog.beat` after every step. The allowed silence is
``max(watchdog.min_timeout_s, watchdog.step_factor x median of the recent step times)``; long phases
(evaluation, checkpoint saves, export) run inside :meth:`StepWatchdog.phase` with ``watchdog.phase_timeout_s``.
Nothing is armed before the first step (start-up is bounded by the process group's timeout).
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from trainer.config import WatchdogConfig
from trainer.resilience.failure import HANG_EXIT_CODE, hard_exit, record_failure
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)


class StepWatchdog:
    """A daemon thread per rank; see the module docstring."""

    def __init__(self, cfg: WatchdogConfig, run_dir: Path, rank: int) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.rank = rank
        self._times: deque[float] = deque(maxlen=50)
        self._last = time.monotonic()
        self._step = 0
        self._phase: str | None = None
        self._armed = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)

    def start(self) -> StepWatchdog:
        """Start watching (a no-op when ``watchdog.enabled`` is false)."""
        if self.cfg.enabled:
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (end of the run, or an error already being handled)."""
        self._stop.set()

    def beat(self, step: int) -> None:
        """Step ``step`` finished: progress, and one more step time for the timeout."""
        now = time.monotonic()
        with self._lock:
            if self._armed:
                self._times.append(now - self._last)
            self._armed, self._step, self._last = True, step, now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A long phase (evaluation, save, export) with its own timeout; progress resumes after it."""
        with self._lock:
            self._phase, self._last = name, time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._phase, self._last = None, time.monotonic()

    def timeout(self) -> float:
        """The silence allowed now, in seconds."""
        if self._phase is not None:
            return self.cfg.phase_timeout_s
        median = statistics.median(self._times) if self._times else 0.0
        return max(self.cfg.min_timeout_s, self.cfg.step_factor * median)

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.cfg.min_timeout_s / 4)):
            with self._lock:
                armed, silent, limit = self._armed, time.monotonic() - self._last, self.timeout()
                where = f"phase {self._phase}" if self._phase else f"the step after step {self._step}"
            if armed and silent > limit:
                self._fire(where, silent, limit)

    def _fire(self, where: str, silent: float, limit: float) -> None:
        path = RunDir(self.run_dir).hangs / f"rank_{self.rank:05d}.txt"
        summary = (
            f"watchdog: no progress for {silent:.0f}s in {where} (timeout {limit:.0f}s; set watchdog.min_timeout_s, "
            f"watchdog.step_factor or watchdog.phase_timeout_s); stacks of every thread in {path}"
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(summary + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as err:
            log.error("could not write the stack dump %s: %s", path, err)
        record_failure(self.run_dir, self.rank, summary, path.read_text() if path.exists() else summary)
        hard_exit(HANG_EXIT_CODE)
