"""The trainer every stage shares: resume, steps, logging, evaluation, checkpoints, preemption, export.

A stage (FCMAE pretraining, fine-tuning, detection; :mod:`trainer.stages`) supplies its model, loaders, loss,
evaluation and export. :class:`Trainer` does the rest the same way for all of them:

    __init__: preemption flag -> distributed -> stage -> newest checkpoint -> DeepSpeed engine
    resume:   engine, loader, stage and loop state from that checkpoint
    train:    micro-batches -> train_step -> log (a loss spike rolls back) -> evaluate (gives way to a preemption)
              -> checkpoint by steps or minutes (or save and exit on preemption) -> export -> mirror uploads
    close:    watchdog, loader workers, ledger, signal handlers, process group

The step does not wait for the device: losses and the finiteness of each micro-batch stay on the device, and the
host reads them once per log interval (see :meth:`Trainer.train_step` for the syncs that remain, and why).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data.sampling import derive_seed
from trainer.config import TrainConfig
from trainer.distributed import barrier, gather_objects, init_distributed, teardown
from trainer.engine import deepspeed_config, initialize
from trainer.observability.logger import MetricsLogger
from trainer.observability.metrics import Meter, device_peak_flops
from trainer.observability.profiling import StepProfiler, SystemMetrics
from trainer.observability.tracking import Tracker, git_commit
from trainer.optim import lr_at, set_lr
from trainer.resilience import faults
from trainer.resilience.checkpoint import Checkpointer, CheckpointInfo, checkpoint_bytes
from trainer.resilience.failure import DiskFullError, disk_full
from trainer.resilience.ledger import SampleLedger
from trainer.resilience.preemption import REQUEUE_EXIT_CODE, PreemptionHandler
from trainer.resilience.recovery import Rollback, RollbackLog, SegmentLog, SpikeDetector
from trainer.resilience.run_lock import slurm_job_id
from trainer.resilience.watchdog import StepWatchdog
from trainer.stages import Batch, autocast, stage_class

log = logging.getLogger(__name__)

TAG_DROP_PATH = 22


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row); the message says why."""


@dataclass
class LoopState:
    """What the loop accumulates over the whole run, saved with every checkpoint so that a requeued run reports
    the whole run (nanochat's single saved loop state)."""

    first_loss: float | None = None
    train_time_s: float = 0.0
    """Wall time of the earlier segments (the current one is added when saving or exporting)."""
    restarts: int = 0

    @classmethod
    def resumed(cls, saved: dict[str, Any], restarts: int) -> LoopState:
        """The state of a checkpoint in a run that has started ``restarts + 1`` times (all its segments count,
        also those that ended before saving)."""
        first = saved.get("first_loss")
        return cls(
            first_loss=None if first is None else float(first),
            train_time_s=float(saved.get("train_time_s", 0.0)),
            restarts=restarts,
        )

    def to_dict(self, segment_s: float) -> dict[str, Any]:
        """The state as saved (and reported in ``metrics.json``), with the current segment's time added."""
        return {"first_loss": self.first_loss, "train_time_s": self.train_time_s + segment_s, "restarts": self.restarts}


@dataclass
class StepResult:
    """What one optimizer step produced. ``loss_sum``/``loss_count`` (finite micro-batch losses of this rank)
    stay on the device; ``grad_norm`` is whatever DeepSpeed holds (read at log time)."""

    loss_sum: torch.Tensor
    loss_count: torch.Tensor
    grad_norm: Any
    skipped: bool


class SkipGuard:
    """Counts skipped (non-finite) steps; too many in a row exhaust the budget (the trainer rolls back or stops)."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def update(self, skipped: bool, step: int) -> bool:
        """Record one step; True when ``max_in_row`` steps in a row were skipped."""
        self.in_row = self.in_row + 1 if skipped else 0
        self.total += int(skipped)
        if skipped:
            log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", step, self.in_row)
        return self.in_row >= self.max_in_row

    def error(self, step: int, checkpoint_dir: Path, rollbacks: int) -> TrainingError:
        """The error that ends a run whose budget is exhausted and cannot roll back."""
        return TrainingError(
            f"{self.in_row} steps in a row had a non-finite loss or gradient (last: step {step}; {rollbacks} "
            "rollbacks made, schedule.max_rollbacks); lower optim.base_lr, set optim.grad_clip, or use "
            f"deepspeed.precision=fp32. The last complete checkpoint is in {checkpoint_dir}"
        )


@dataclass
class Spike:
    """A reason to roll back, found at a log point (the same on every rank: it comes from all-reduced values)."""

    step: int
    """The step it was found at."""
    first_step: int
    """The first step of the bad stretch (the log interval's first step, or the first non-finite step)."""
    cause: str
    loss: float
    threshold: float


class Interval:
    """Losses since the last log point, summed on the device; read (and reduced over ranks) once per interval."""

    def __init__(self, device: torch.device) -> None:
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, finite micro-batches
        self.grad_norm: Any = None
        self.skipped = False

    def add(self, result: StepResult) -> None:
        """Accumulate one step (no host read)."""
        self.totals[0] += result.loss_sum
        self.totals[1] += result.loss_count
        self.grad_norm, self.skipped = result.grad_norm, result.skipped

    def mean_loss(self, counters: Sequence[int] = ()) -> tuple[float, list[int]]:
        """Mean finite micro-batch loss over all ranks and the sums of this rank's ``counters`` over all ranks (one
        all-reduce, one host read); resets the loss sums."""
        totals = torch.cat([self.totals, torch.tensor(counters, dtype=torch.float64).to(self.totals.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        self.totals.zero_()
        loss_sum, count, *summed = totals.tolist()  # sync: the log interval's one read of the losses
        return (loss_sum / count if count else float("nan")), [round(n) for n in summed]

    def grad_norm_value(self) -> float:
        """The last step's global gradient norm (NaN when that step was skipped)."""
        if self.grad_norm is None or self.skipped:
            return float("nan")
        return float(self.grad_norm)  # sync (when DeepSpeed holds a tensor): at log intervals only


def micro_batch_groups(loader: Any, accum: int, device: torch.device) -> Generator[tuple[int, list[Batch]], None, None]:
    """Endless (epoch, micro-batches of one step); epochs advance as the loader finishes them. A partial group at
    the end of an epoch is dropped (every rank has the same batch count, so all drop it)."""
    while True:
        epoch = loader.epoch
        group: list[Batch] = []
        for images, labels in loader:
            group.append((images.to(device, non_blocking=True), labels, list(loader.last_keys)))
            if len(group) == accum:
                yield epoch, group
                group = []


class Trainer:
    """Trains (or resumes) one stage in a run directory; :meth:`run` returns the process's exit code."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.preemption = PreemptionHandler().install()  # first: a signal during start-up must not kill the rank
        self.env = env = init_distributed()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.stage = stage_class(cfg.stage)(cfg, env, run_dir)  # type: ignore[call-arg]
        self.accum = cfg.deepspeed.grad_accum
        self.steps_per_epoch = len(self.stage.loader) // self.accum
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{len(self.stage.loader)} batches per epoch cannot fill one step of deepspeed.grad_accum="
                f"{self.accum}: lower data.batch_size or deepspeed.grad_accum"
            )
        self.total = cfg.total_steps(self.steps_per_epoch)
        self.warmup = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.global_batch = cfg.global_batch(env.world_size)
        self.peak_lr = cfg.lr(env.world_size)

        self.rollbacks = RollbackLog(run_dir)
        self.checkpointer = Checkpointer(
            run_dir / "checkpoints", cfg.checkpoint, env, [r["restored_step"] for r in self.rollbacks.read()]
        )
        self.resume_from = self.checkpointer.find_latest()
        self.segments = SegmentLog(run_dir)
        if env.is_main:
            self.segments.start(self.resume_from.tag if self.resume_from else None)
        self.universal = self.resume_from is not None and self.checkpointer.needs_universal(self.resume_from)
        if self.universal and self.resume_from is not None:
            self.checkpointer.prepare_universal(self.resume_from, timeout_s=cfg.watchdog.phase_timeout_s)
        ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.data.batch_size, env.world_size)
        if self.universal:
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine = initialize(self.stage.model, self.stage.optimizer(), ds_config)

        self.step = 0
        self.skip_guard = SkipGuard(cfg.schedule.max_skipped_steps)
        self.loop_state = LoopState(restarts=self.segments.restarts() if env.is_main else 0)
        self.tracker = Tracker(run_dir, cfg.tracking.tracking_uri, cfg.tracking.experiment, enabled=env.is_main)
        self.logger = MetricsLogger(run_dir, self.tracker, self.total, enabled=env.is_main)
        self.watchdog = StepWatchdog(cfg.watchdog, run_dir, env.rank)
        self.profiler = StepProfiler(cfg.tracking.profile_steps, run_dir, env, self.tracker, self.watchdog)
        self.system_metrics: SystemMetrics | None = None
        self.ledger: SampleLedger | None = None
        self.groups: Generator[tuple[int, list[Batch]], None, None] | None = None
        self.eval_metrics: dict[str, float] = {}
        self.last_loss = float("nan")
        self.started = time.perf_counter()
        self.spikes = SpikeDetector(cfg.schedule.spike_factor, cfg.schedule.spike_window)
        self.pending: Spike | None = None
        self.recent_keys: list[tuple[int, list[str]]] = []
        """This rank's sample keys per step since the oldest kept checkpoint (what a rollback may skip); saved with
        every checkpoint, so a resumed run records whole rollbacks too."""
        self.last_save_time = time.monotonic()
        self.eval_pending = False
        """A preemption stopped the evaluation of the checkpoint's step: the resumed run evaluates it first."""
        self.interval = Interval(env.device)
        """The losses of the current log interval; saved with each checkpoint, so that a run resumed inside an
        interval logs (and tests for a spike) the same mean as the uninterrupted run."""

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any: engine, loader position, stage and loop state."""
        if self.resume_from is None:
            return
        state = self.checkpointer.load(self.engine, self.resume_from, load_universal=self.universal)
        self._restore(state)
        self.loop_state = LoopState.resumed(state.get("loop", {}), self.loop_state.restarts)
        self.spikes.load_state_dict(state.get("spikes", {}))
        self.eval_pending = bool(state.get("eval_pending", False))
        self.recent_keys = [(int(step), list(keys)) for step, keys in state.get("recent_keys", [])]
        if "interval" in state:
            self.interval.totals.copy_(torch.tensor(state["interval"], dtype=torch.float64))
        self._continue_rollback(self.resume_from)
        if int(state.get("global_batch", self.global_batch)) != self.global_batch and self.env.is_main:
            log.warning(
                "global batch changed from %d to %d on resume: the lr is rescaled and steps per epoch change",
                int(state["global_batch"]), self.global_batch,
            )  # fmt: skip
        if self.env.is_main:
            log.info("resumed from %s at step %d (epoch %d)", self.resume_from.path, self.step, self.stage.loader.epoch)

    def _restore(self, state: dict[str, Any]) -> None:
        """Step, skip count, loader position and stage state of a loaded checkpoint."""
        self.step = int(state["step"])
        self.skip_guard.total = int(state.get("skipped_total", 0))
        self.stage.loader.load_state_dict(state["loader"])
        self.stage.load_state_dict(state.get("stage", {}))

    def _continue_rollback(self, info: CheckpointInfo) -> None:
        """A checkpoint that a later recorded rollback restored resumes as that rollback left the run: the loader
        after the skipped samples and the spike statistic of then (the crash came before the next save)."""
        records = self.rollbacks.read()
        after = [r for i, r in enumerate(records) if i >= info.timeline and r["restored_step"] == info.step]
        if not after or "resume" not in after[-1]:
            return
        resume = after[-1]["resume"]
        loaders = resume["loader"]
        self.stage.loader.load_state_dict(loaders[self.env.rank if self.env.rank < len(loaders) else 0])
        self.spikes.load_state_dict({"history": resume["spikes"]})
        self.interval.totals.zero_()  # a rollback follows a log point: its interval is empty
        if self.env.is_main:
            log.info(
                "continuing the rollback of step %d: its skipped samples stay skipped", after[-1]["detected_at_step"]
            )

    def run(self) -> int:
        """Resume, start tracking, train and close; returns 0 or :data:`REQUEUE_EXIT_CODE`."""
        status = "FAILED"
        try:
            self.resume()
            self._start_tracking()
            code = self.train()
            status = "FINISHED" if code == 0 else "KILLED"
            return code
        finally:
            try:
                if self.system_metrics is not None:  # its last samples go in before the run ends
                    self.system_metrics.close()
                self.tracker.finish(status)
            except Exception as err:  # a failed run's tracking (a full disk, a lost server) must not mask its cause
                if status != "FAILED":
                    raise
                log.error("could not close the MLflow run: %s: %s", type(err).__name__, err)
            self.close(failed=status == "FAILED")

    def train(self) -> int:
        """The loop: steps until the total, then the export; a preemption saves and returns the requeue code."""
        if self.step >= self.total and (self.run_dir / "export" / "metrics.json").exists():
            if self.env.is_main:
                log.info("run already complete (%d steps); exports are in %s", self.step, self.run_dir / "export")
            return 0
        cfg, env = self.cfg, self.env
        self.watchdog.start()
        if cfg.tracking.sample_ledger:
            self.ledger = SampleLedger(self.run_dir / "ledger", env, self.step)
        peak = device_peak_flops(env.device, cfg.deepspeed.precision)
        meter = Meter(self.global_batch, env.world_size, self.total, self.stage.flops, peak)
        interval = self.interval
        self.groups = micro_batch_groups(self.stage.loader, self.accum, env.device)
        self._check_save_window(self._estimated_save_s(), "estimated")
        if self.eval_pending and self._evaluate_or_stop(meter):  # the one a preemption stopped
            return REQUEUE_EXIT_CODE
        while self.step < self.total:
            with self.profiler.step(self.step + 1):
                t0 = time.perf_counter()
                epoch, group = next(self.groups)
                meter.add(data_s=time.perf_counter() - t0)
                lr = lr_at(self.step, self.total, self.warmup, self.peak_lr, cfg.optim.min_lr)
                result = self.train_step(group, lr)
                self._after_step(epoch, group, result, interval)
            meter.exclude(self.profiler.written_seconds())
            if self.step % cfg.tracking.log_every == 0 or self.step == self.total or self.pending is not None:
                self._log(epoch, lr, interval, meter)
            if self.pending is not None:
                self._rollback(self.pending)
                continue
            epoch_end = cfg.eval.each_epoch and self.step % self.steps_per_epoch == 0
            eval_due = self.step % cfg.eval.every_steps == 0 or self.step == self.total or epoch_end
            if eval_due and self._evaluate_or_stop(meter):
                return REQUEUE_EXIT_CODE
            stop, due = self.preemption.poll(env.device, save_due=self._save_due())
            if stop or due or self.step % cfg.checkpoint.every_steps == 0 or self.step == self.total:
                self.save()
            if stop:
                self._finish_uploads(at_preemption=True)
                return REQUEUE_EXIT_CODE
        self.export()
        self._finish_uploads(at_preemption=False)
        return 0

    def train_step(self, group: list[Batch], lr: float) -> StepResult:
        """One optimizer step over ``grad_accum`` micro-batches, without waiting for the device.

        A non-finite loss multiplies this rank's loss by NaN, so its gradients are NaN; DeepSpeed's gradient
        all-reduce carries the NaN to every rank, and every rank skips the update (DeepSpeed's overflow check)
        without a collective of ours. Drop path draws come from (seed, step, rank, micro-batch), so a resumed run
        draws what the uninterrupted one drew. Host reads that remain, once per optimizer step: DeepSpeed's own
        overflow check and gradient norm inside ``engine.step()``, and under ZeRO-0 our finiteness check of the
        gradients (ZeRO-0 runs the client optimizer, which would apply NaN gradients).
        """
        cfg, env, engine = self.cfg, self.env, self.engine
        set_lr(engine.optimizer, lr)
        skipped_before = engine.skipped_steps
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        loss_count = torch.zeros((), dtype=torch.float64, device=env.device)
        dropped, grad_norm = False, None
        for micro, batch in enumerate(group):
            torch.manual_seed(derive_seed(cfg.seed, TAG_DROP_PATH, self.step, env.rank, micro))
            with autocast(cfg.deepspeed.precision, env.device):
                loss = self.stage.loss(engine, batch, self.step, micro)
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach().double(), 0.0)
            loss_count += finite.double()
            engine.backward(loss * torch.where(finite, 1.0, float("nan")))
            if micro == len(group) - 1 and cfg.deepspeed.zero_stage == 0:
                grad_norm = self._zero0_grad_norm()
                if not bool(grad_norm.isfinite()):  # sync: ZeRO-0 only, see above
                    dropped = True  # AdamW skips parameters without gradients
                    for param in engine.module.parameters():
                        param.grad = None
            engine.step()
        skipped = dropped or engine.skipped_steps > skipped_before
        if grad_norm is None:
            grad_norm = engine.get_global_grad_norm()
        return StepResult(loss_sum, loss_count, grad_norm, skipped)

    def _zero0_grad_norm(self) -> torch.Tensor:
        """The global gradient norm after the all-reduce (the same on every rank), one fused op over all gradients:
        NaN or Inf in any gradient makes it non-finite. DeepSpeed reports no norm under ZeRO-0 without clipping."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.env.device)

    def _after_step(self, epoch: int, group: list[Batch], result: StepResult, interval: Interval) -> None:
        self.step += 1
        self.watchdog.beat(self.step)
        keys = [key for _, _, batch_keys in group for key in batch_keys]
        if self.ledger is not None:
            self.ledger.record(self.step, epoch, keys)
        faults.at("step", self.step, self.run_dir)
        self.recent_keys.append((self.step, keys))
        self.stage.after_step(self.engine, self.step, result.skipped)
        if self.skip_guard.update(result.skipped, self.step):
            if self.rollbacks.count() >= self.cfg.schedule.max_rollbacks:
                raise self.skip_guard.error(self.step, self.checkpointer.root, self.rollbacks.count())
            first = self.step - self.skip_guard.in_row + 1
            self.pending = Spike(self.step, first, "non-finite steps", float("nan"), float("nan"))
        if self.loop_state.first_loss is None and not result.skipped:
            # sync: once per run, the first step's loss (the summary's "first_loss")
            self.loop_state.first_loss = float(result.loss_sum / result.loss_count)
        interval.add(result)

    def _log(self, epoch: int, lr: float, interval: Interval, meter: Meter) -> None:
        loader = self.stage.loader
        mixture = getattr(getattr(loader, "shards", None), "mixture", None)
        self.last_loss, served = interval.mean_loss(loader.source_samples if mixture else ())
        perf = meter.flush(self.step, self.env.device)
        progress = (
            epoch + ((self.step - 1) % self.steps_per_epoch + 1) / self.steps_per_epoch
        )  # 1.0 at the end of epoch 0
        scalars = {
            "loss": self.last_loss,
            "lr": lr,
            "grad_norm": interval.grad_norm_value(),
            "skipped_steps": float(self.skip_guard.total),
        }
        if mixture:  # samples served per source since the run began, all ranks
            scalars.update({f"samples_{source.name}": float(n) for source, n in zip(mixture, served, strict=True)})
        self.logger.train(self.step, progress, scalars, perf)
        threshold = self.spikes.check(self.last_loss)  # the all-reduced loss: every rank decides the same
        if threshold is not None and self.pending is None:
            first = self.step - (self.step - 1) % self.cfg.tracking.log_every
            self.pending = Spike(self.step, first, "loss spike", self.last_loss, threshold)

    def evaluate(self) -> tuple[float, bool]:
        """The stage's evaluation, logged with its duration; returns the seconds it took and whether a preemption
        signal stopped it (all ranks agree after every evaluation batch)."""
        t0 = time.perf_counter()
        if self.env.is_main:
            log.info("step %d: evaluating", self.step)
        with self.watchdog.phase("evaluation"):
            evaluation = self.stage.evaluate(self.engine, self.step, self._evaluation_stop)
        seconds = time.perf_counter() - t0
        if evaluation.stopped is not None:
            if self.env.is_main:
                done, total = evaluation.stopped
                log.warning(
                    "evaluation at step %d stopped after %d of %d batches: preemption (%.1fs)",
                    self.step, done, total, seconds,
                )  # fmt: skip
            return seconds, True
        self.eval_metrics = evaluation.metrics
        self.logger.eval(self.step, evaluation.metrics, seconds, evaluation.artifacts)
        for key, value in evaluation.tags.items():
            self.tracker.set_tag(key, value)
        return seconds, False

    def _evaluation_stop(self) -> bool:
        """Collective, after each evaluation batch: a preemption signal stops the evaluation."""
        faults.at("evaluation", self.step, self.run_dir)
        return self.preemption.should_stop(self.env.device)

    def save(self) -> None:
        """A checkpoint of the engine, this rank's loader and stage state, and the loop state."""
        rank_state = {
            "loader": self.stage.loader.state_dict(),
            "stage": self.stage.state_dict(),
            "skipped_total": self.skip_guard.total,
            "global_batch": self.global_batch,
            "loop": self.loop_state.to_dict(time.perf_counter() - self.started),
            "spikes": self.spikes.state_dict(),
            "eval_pending": self.eval_pending,
            "recent_keys": self.recent_keys,
            "interval": self.interval.totals.tolist(),  # sync: at saves only
        }
        with self.watchdog.phase("checkpoint save"):
            self.checkpointer.save(self.engine, self.step, rank_state)
        self.last_save_time = time.monotonic()
        kept = self.checkpointer.complete()
        oldest = kept[0].step if kept else self.step  # no rollback restores a step before it
        self.recent_keys = [(step, keys) for step, keys in self.recent_keys if step > oldest]
        upload = (
            self.checkpointer.uploader.done[-1].seconds
            if self.checkpointer.uploader and self.checkpointer.uploader.done
            else 0.0
        )
        self._check_save_window((self.checkpointer.last_save_s or 0.0) + upload, "measured")

    def _evaluate_or_stop(self, meter: Meter) -> bool:
        """Evaluate; when a preemption stops the evaluation, save (marking it pending) and return True."""
        seconds, self.eval_pending = self.evaluate()
        meter.exclude(seconds)
        if self.eval_pending:  # the save comes first; the resumed run evaluates this step again
            self.save()
            self._finish_uploads(at_preemption=True)
        return self.eval_pending

    def _save_due(self) -> bool:
        """Rank 0's clock says ``checkpoint.every_minutes`` passed since the last save (agreed in the step's poll)."""
        minutes = self.cfg.checkpoint.every_minutes
        return minutes is not None and self.env.is_main and time.monotonic() - self.last_save_time >= 60 * minutes

    def _estimated_save_s(self) -> float:
        """A save's duration before one was measured: the checkpoint's size over ``checkpoint.write_mb_per_s``."""
        params = sum(p.numel() for p in self.stage.model.parameters())
        size = checkpoint_bytes(params, self.cfg.deepspeed.precision, self.cfg.deepspeed.zero_stage)
        return size / (self.cfg.checkpoint.write_mb_per_s * 1e6)

    def _check_save_window(self, seconds: float, how: str) -> None:
        """Warn (rank 0) when a save, and the mirror upload after it, would not fit in the preemption warning window."""
        window = self.cfg.cluster.signal_delay_s
        if self.env.is_main and seconds > 0.8 * window:
            log.warning(
                "a checkpoint save%s takes %.0fs (%s), more than 80%% of the %ds preemption warning window "
                "(cluster.signal_delay_s): a preemption may kill it; raise cluster.signal_delay_s, save to faster "
                "storage, or lower checkpoint.write_mb_per_s's estimate to match",
                " and its mirror upload" if self.cfg.checkpoint.mirror_url else "", seconds, how, window,
            )  # fmt: skip

    def _finish_uploads(self, at_preemption: bool) -> None:
        """Let the background mirror upload finish: within what is left of the warning window at a preemption,
        within ``watchdog.phase_timeout_s`` at the end of the run; a mirror left behind is reported."""
        if self.checkpointer.uploader is None:
            return
        timeout = self.cfg.watchdog.phase_timeout_s
        if at_preemption:
            left = self.preemption.seconds_left(self.cfg.cluster.signal_delay_s)
            timeout = max(0.0, (left if left is not None else self.cfg.cluster.signal_delay_s) - 10.0)
        with self.watchdog.phase("mirror upload"):
            if not self.checkpointer.wait_for_uploads(timeout):
                self.tracker.set_tag("mirror_incomplete", self.checkpointer.uploader.busy() or "failed")

    def _rollback(self, spike: Spike) -> None:
        """Restore the newest checkpoint saved before ``spike.first_step`` and skip the samples of the steps after
        it up to the spike (all ranks, in lockstep: every decision comes from all-reduced values).

        The line in ``rollbacks.jsonl`` is the commit: from then on the checkpoints after the target are abandoned
        (:class:`~trainer.resilience.checkpoint.Checkpointer`) and a resume from the target continues as this rollback
        left the run (:meth:`_continue_rollback`), so a crash at any moment neither replays the skipped samples nor
        spends a second rollback on the same spike. The loader goes on from where it is (after the spike), so repeated
        rollbacks to one checkpoint skip every bad stretch."""
        self.pending = None
        made, limit = self.rollbacks.count(), self.cfg.schedule.max_rollbacks
        target = next((c for c in reversed(self.checkpointer.complete()) if c.step < spike.first_step), None)
        if made >= limit:
            raise TrainingError(
                f"{spike.cause} at step {spike.step} (loss {spike.loss:.4g}, threshold {spike.threshold:.4g}) after "
                f"{made} rollbacks (schedule.max_rollbacks={limit}; see {self.rollbacks.path}): the run keeps "
                "spiking. Lower optim.base_lr, set optim.grad_clip, check the data the rollbacks name, or raise "
                f"schedule.max_rollbacks. The last complete checkpoint is in {self.checkpointer.root}"
            )
        if target is None:
            if spike.cause == "non-finite steps":
                raise self.skip_guard.error(self.step, self.checkpointer.root, made)
            if self.env.is_main:
                log.warning("loss spike at step %d (%.4g > %.4g) not rolled back: no checkpoint precedes it",
                            spike.step, spike.loss, spike.threshold)  # fmt: skip
            return
        skipped = [(step, keys) for step, keys in self.recent_keys if target.step < step <= spike.step]
        keys = [key for share in gather_objects([k for _, ks in skipped for k in ks]) for key in share]
        assert self.groups is not None
        self.groups.close()  # stops the loader's workers before its position changes
        here = self.stage.loader.state_dict()  # after the spike: where training goes on
        loaders = gather_objects(here)
        state = self.checkpointer.load(self.engine, target, load_universal=False)
        self._restore(state)
        self.stage.loader.load_state_dict(here)
        record = Rollback(
            spike.step, spike.cause, spike.loss, spike.threshold, target.step, [target.step + 1, spike.step], keys,
            time.time(), {"loader": loaders, "spikes": self.spikes.state_dict()["history"]},
        )  # fmt: skip
        if self.env.is_main:
            self.rollbacks.append(record)
        barrier()
        faults.at("rollback", spike.step, self.run_dir)
        self.checkpointer.rolled_back(target)
        if self.ledger is not None:
            self.ledger.rewind(target.step)
        self.recent_keys = [(step, ks) for step, ks in self.recent_keys if step <= target.step]
        self.groups = micro_batch_groups(self.stage.loader, self.accum, self.env.device)
        self.skip_guard.in_row = 0
        if self.env.is_main:
            log.warning(
                "%s at step %d (loss %.4g > %.4g): rolled back to %s and skipped the %d samples of steps %d-%d "
                "(rollback %d of at most %d; %s)",
                spike.cause, spike.step, spike.loss, spike.threshold, target.tag, len(keys), target.step + 1,
                spike.step, made + 1, limit, self.rollbacks.path,
            )  # fmt: skip
            self.tracker.log_metrics({"rollbacks": float(made + 1)}, spike.step)
            self.tracker.set_tag("rollbacks", str(made + 1))
            self.tracker.log_artifact(self.rollbacks.path, "rollbacks")

    def export(self) -> None:
        """The stage's weights and ``metrics.json`` (the run's summary) for the next stage."""
        summary = {
            "stage": self.cfg.stage,
            "steps": self.step,
            "final_loss": self.last_loss,
            "skipped_steps": self.skip_guard.total,
            **self.loop_state.to_dict(time.perf_counter() - self.started),
            "loader_samples_skipped": getattr(getattr(self.stage.loader, "stats", None), "skipped", 0),
            **self.eval_metrics,
        }
        out = self.run_dir / "export"
        try:
            with self.watchdog.phase("export"):
                self.stage.export(self.engine, out, summary)
        except Exception as err:
            if not disk_full(err, self.run_dir):
                raise
            copy = sum(p.numel() for p in self.stage.model.parameters()) * 4
            raise DiskFullError(
                f"no space left on the device of {out} while exporting the weights (about {copy / 1e6:.0f} MB per "
                "fp32 copy; partial files removed). Free space there and re-run the same command: the run's last "
                f"checkpoint is intact and the export is redone from it."
            ) from err
        if self.env.is_main:
            self.tracker.log_artifact(out / "model.safetensors", "export")
            self.tracker.log_artifact(out / "metrics.json", "export")
            log.info("done: %d steps, weights and metrics in %s", self.step, out)

    def close(self, failed: bool) -> None:
        """Stop the watchdog, the loader workers (they ignore SIGTERM and would block exit), the ledger and the
        signal handlers; tear the process group down (locally only after a failure)."""
        self.watchdog.stop()
        self.profiler.close()
        if self.groups is not None:
            self.groups.close()
        if self.ledger is not None:
            self.ledger.close()
        self.preemption.uninstall()
        teardown(self.engine, clean=not failed)

    def _start_tracking(self) -> None:
        cfg, env = self.cfg, self.env
        self.tracker.start(
            params=cfg.model_dump(mode="json"), tags=self._tags(), run_name=f"{cfg.name}-{self.run_dir.name}"
        )
        if cfg.tracking.system_metrics:  # every rank: other nodes receive rank 0's run id
            self.system_metrics = SystemMetrics(
                cfg.tracking.system_metrics_interval_s, env, self.tracker, self._nodes()
            )
        if not env.is_main:
            return
        if self.tracker.restart_count == 0:
            self.tracker.log_config(cfg.model_dump(mode="json"))
        log.info(
            "%s | %s | world %d | global batch %d (%d x %d accum x %d ranks) | lr %.3g | %d steps/epoch | %d steps",
            cfg.stage, self.stage.describe(), env.world_size, self.global_batch, cfg.data.batch_size, self.accum,
            env.world_size, self.peak_lr, self.steps_per_epoch, self.total,
        )  # fmt: skip
        profile = cfg.tracking.profile_steps
        if profile is not None and (profile[0] > self.total or profile[1] <= self.step):
            log.warning("tracking.profile_steps %s: outside steps %d-%d, nothing will be profiled",
                        list(profile), self.step + 1, self.total)  # fmt: skip

    def _nodes(self) -> int:
        """How many hosts the job spans (SLURM's count, else the world over the config's ranks per node)."""
        per_node = self.cfg.cluster.ranks_per_node
        return int(os.environ.get("SLURM_JOB_NUM_NODES", max(1, self.env.world_size // max(1, per_node))))

    def _tags(self) -> dict[str, str]:
        return {
            "git_commit": git_commit(),
            "world_size": str(self.env.world_size),
            "hosts": str(self._nodes()),
            "slurm_job_id": slurm_job_id() or "none",
            "stage": self.cfg.stage,
        }


def train(cfg: TrainConfig, run_dir: Path) -> int:
    """Train (or resume) ``cfg``'s stage in ``run_dir``; returns the exit code (0, or :data:`REQUEUE_EXIT_CODE`)."""
    return Trainer(cfg, run_dir).run()
