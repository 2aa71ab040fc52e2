"""Operator tools for a long run: a profile of a few steps, and the machines' metrics in MLflow.

``tracking.profile_steps: [first, last]``: every rank records optimizer steps ``first`` to ``last`` with the PyTorch
profiler (operators with shapes and memory, CUDA kernels on GPUs; each step marked ``ProfilerStep#<step>``) and
writes, in ``<run_dir>/profile/steps_<first>-<last>/``:

- ``rank_<N>.trace.json.gz``: the Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing);
- ``rank_<N>.ops.txt``: the operators' table by self time (device time on GPUs);
- on CUDA, ``rank_<N>.memory.pickle``: a memory snapshot of the same steps, every allocation with its stack (drop it
  on https://pytorch.org/memory_viz).

Rank 0 logs the files of all ranks as MLflow artifacts under ``profile/`` and the top operators on the console. A
run resumed inside the range profiles what is left of it; one resumed after it profiles nothing.

``tracking.system_metrics``: MLflow's system metrics monitor (CPU, memory, disk, network; GPU utilization, memory
and power through NVML) on the first rank of every node, one sample every ``tracking.system_metrics_interval_s``
seconds, as ``system/...`` metrics of the run (``system/node_<K>/...`` when the job spans nodes).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer.distributed import DistEnv, gather_lists
from trainer.observability.tracking import Tracker
from trainer.resilience.watchdog import StepWatchdog
from trainer.run_dir import RunDir

log = logging.getLogger(__name__)

MEMORY_HISTORY_ENTRIES = 200_000


class StepProfiler:
    """Profiles the optimizer steps of ``tracking.profile_steps`` on every rank (see the module docstring)."""

    def __init__(
        self, steps: tuple[int, int] | None, run_dir: Path, env: DistEnv, tracker: Tracker, watchdog: StepWatchdog
    ) -> None:
        self.first, self.last = steps if steps is not None else (0, -1)
        self.run_dir, self.env, self.tracker, self.watchdog = run_dir, env, tracker, watchdog
        self._done = False
        """Written once: a rollback into the range does not profile it again."""
        self._profiler: Any = None
        self._started_at = 0
        self._cuda = env.device.type == "cuda"
        self._write_s = 0.0

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around optimizer step ``step`` (its data wait included): starts the profiler at the range's first step
        (or the first one this run reaches inside it), marks the step, and writes the files after the last one.
        Every rank calls it at the same steps (the writes end with a gather)."""
        if self._profiler is None and not self._done and self.first <= step <= self.last:
            self._start(step)
        if self._profiler is None:
            yield
            return
        with torch.profiler.record_function(f"ProfilerStep#{step}"):
            yield
        if step >= self.last:
            with self.watchdog.phase("profile export"):
                self._finish(step)

    def _start(self, step: int) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self._cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        self._profiler.start()
        self._started_at = step
        if self.env.is_main:
            log.info("profiling steps %d-%d (tracking.profile_steps)", step, self.last)

    def check_range(self, step: int, total: int) -> None:
        """Warn (rank 0) when ``tracking.profile_steps`` lies outside the steps this segment will run."""
        if self.last >= self.first and self.env.is_main and (self.first > total or self.last <= step):
            log.warning("tracking.profile_steps %s: outside steps %d-%d, nothing will be profiled",
                        [self.first, self.last], step + 1, total)  # fmt: skip

    def written_seconds(self) -> float:
        """Seconds spent writing files since the last call (the trainer leaves them out of the images/s)."""
        seconds, self._write_s = self._write_s, 0.0
        return seconds

    def _finish(self, step: int) -> None:
        t0 = time.perf_counter()
        profiler, self._profiler, self._done = self._profiler, None, True
        if self._cuda:
            torch.cuda.synchronize()
        profiler.stop()
        folder = RunDir(self.run_dir).profile / f"steps_{self._started_at}-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        rank = self.env.rank
        files = [folder / f"rank_{rank}.trace.json.gz", folder / f"rank_{rank}.ops.txt"]
        profiler.export_chrome_trace(str(files[0]))
        sort_by = "self_device_time_total" if self._cuda else "self_cpu_time_total"
        averages = profiler.key_averages()
        files[1].write_text(averages.table(sort_by=sort_by, row_limit=40) + "\n")
        if self._cuda:
            files.append(folder / f"rank_{rank}.memory.pickle")
            torch.cuda.memory._dump_snapshot(str(files[-1]))
            torch.cuda.memory._record_memory_history(enabled=None)
        written = gather_lists([str(f) for f in files])  # all ranks wrote theirs
        if self.env.is_main:
            for path in written:
                self.tracker.log_artifact(Path(path), f"{folder.parent.name}/{folder.name}")
        self._write_s += time.perf_counter() - t0
        if not self.env.is_main:
            return
        top = sorted(averages, key=lambda e: getattr(e, sort_by), reverse=True)[:5]
        total = sum(getattr(e, sort_by) for e in averages) or 1
        ops = ", ".join(f"{e.key} {100 * getattr(e, sort_by) / total:.0f}%" for e in top)
        log.info(
            "profile of steps %d-%d: %d files of %d ranks in %s (MLflow artifacts %s/%s); top ops by self time: %s",
            self._started_at, step, len(written), self.env.world_size, folder, folder.parent.name, folder.name, ops,
        )  # fmt: skip

    def close(self) -> None:
        """Stop a profile the run left unfinished (an error or a preemption inside the range); nothing is written."""
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
            if self._cuda:
                torch.cuda.memory._record_memory_history(enabled=None)


class SystemMetrics:
    """MLflow's system metrics monitor on the first rank of each node (see the module docstring)."""

    def __init__(self, interval_s: float, env: DistEnv, tracker: Tracker, nodes: int) -> None:
        self._monitor: Any = None
        run_id = tracker.run_id
        if nodes > 1:  # the other nodes learn rank 0's run id
            shared = [run_id]
            dist.broadcast_object_list(shared, src=0)
            run_id = shared[0]
        if env.local_rank != 0 or run_id is None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        node = os.environ.get("SLURM_NODEID") or str(env.rank // max(1, env.world_size // nodes))
        self._monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=interval_s,
            resume_logging=tracker.restart_count > 0,
            node_id=f"node_{node}" if nodes > 1 else None,
            tracking_uri=tracker.uri,
        )
        self._monitor.start()
        if env.is_main:
            names = ", ".join(type(m).__name__.removesuffix("Monitor") for m in self._monitor.monitors)
            log.info("system metrics every %gs (%s) on the first rank of %d node(s)", interval_s, names, nodes)

    def close(self) -> None:
        """Stop sampling and flush what was sampled."""
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
