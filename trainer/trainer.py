"""The trainer every stage shares: the loop, read as the algorithm, with one call per concern.

A stage (FCMAE pretraining, fine-tuning, detection; :mod:`trainer.stages`) supplies its model, loaders, loss, the
per-batch work of its evaluation and the files of its export. The components own their policies: the checkpointer
decides when a save is due and checks the preemption window (:mod:`trainer.resilience.checkpoint`), recovery finds
spikes and rolls back (:mod:`trainer.resilience.recovery`), the tracker names and tags the MLflow run
(:mod:`trainer.observability.tracking`), the evaluation loop gives way to a preemption (:mod:`trainer.evaluation`).

    __init__: preemption flag -> distributed -> stage -> newest checkpoint -> DeepSpeed engine -> components
    resume:   engine, loader, stage, recovery and loop state from that checkpoint
    train:    micro-batches -> optimizer step -> log (a spike rolls back) -> evaluate (gives way to a preemption)
              -> save when due (or save and exit on preemption) -> export -> mirror uploads
    close:    watchdog, loader workers, ledger, signal handlers, process group

The step does not wait for the device: losses and the finiteness of each micro-batch stay on the device, and the
host reads them once per log interval (see :mod:`trainer.step` for the syncs that remain, and why).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from data.batch import Batch
from trainer.config import TrainConfig
from trainer.distributed import DistEnv, barrier, init_distributed, teardown
from trainer.engine import deepspeed_config, initialize
from trainer.evaluation import evaluate, evaluation_due
from trainer.observability.logger import MetricsLogger, result_line
from trainer.observability.metrics import Interval, Meter, device_peak_flops
from trainer.observability.profiling import StepProfiler, SystemMetrics
from trainer.observability.tracking import Tracker, job_hosts
from trainer.optim import Schedule
from trainer.resilience import faults
from trainer.resilience.checkpoint import Checkpointer, CheckpointInfo
from trainer.resilience.failure import export_space
from trainer.resilience.ledger import SampleLedger
from trainer.resilience.preemption import REQUEUE_EXIT_CODE, PreemptionHandler
from trainer.resilience.recovery import Recovery, SegmentLog
from trainer.resilience.watchdog import StepWatchdog
from trainer.run_dir import RunDir
from trainer.stages import stage_class
from trainer.step import OptimizerStep, StepResult, micro_batch_groups
from trainer.zero import gathered_parameters

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What the loop accumulates over the whole run, saved with every checkpoint so that a requeued run reports
    the whole run (nanochat's single saved loop state): also a run resumed at its last step, which trains nothing
    and exports the summary it saved."""

    first_loss: float | None = None
    last_loss: float = float("nan")
    """The mean loss of the last log interval (the summary's ``final_loss``)."""
    evaluation: dict[str, float] = field(default_factory=dict)
    """The newest evaluation's values (the summary reports them)."""
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
            last_loss=float(saved.get("last_loss", float("nan"))),
            evaluation={key: float(value) for key, value in saved.get("evaluation", {}).items()},
            train_time_s=float(saved.get("train_time_s", 0.0)),
            restarts=restarts,
        )

    def after_step(self, result: StepResult) -> None:
        """Keep the run's first loss (the summary's ``first_loss``): of the first step that was not skipped."""
        if self.first_loss is None and not result.skipped:
            self.first_loss = float(result.loss_sum / result.loss_count)  # sync: once per run

    def to_dict(self, segment_s: float) -> dict[str, Any]:
        """The state as saved, with the current segment's time added."""
        return {**asdict(self), "train_time_s": self.train_time_s + segment_s}

    def summary(self, segment_s: float) -> dict[str, Any]:
        """The run's part of ``metrics.json``."""
        return {
            "final_loss": self.last_loss,
            "first_loss": self.first_loss,
            "train_time_s": self.train_time_s + segment_s,
            "restarts": self.restarts,
            **self.evaluation,
        }


class Trainer:
    """Trains (or resumes) one stage in a run directory; :meth:`run` returns the process's exit code."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir, self.paths = cfg, run_dir, RunDir(run_dir)
        self.preemption = PreemptionHandler().install()  # first: a signal during start-up must not kill the rank
        self.env = env = init_distributed()
        self.cfg = cfg = fit_to_world(cfg, env)
        self.recovery = Recovery(cfg.schedule, cfg.tracking.log_every, env, run_dir)
        self.checkpointer = Checkpointer(
            self.paths.checkpoints, cfg.checkpoint, env, self.recovery.targets(), cfg.cluster.signal_delay_s
        )
        self.resume_from = self.checkpointer.find_latest()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        fresh = self.resume_from is None  # a resume's checkpoint holds every weight: the stage reads no source
        self.stage = stage_class(cfg.stage)(cfg, env, run_dir, fresh=fresh)  # type: ignore[call-arg]
        self.schedule = schedule = Schedule.of(cfg, len(self.stage.loader), env.world_size)
        self.segments = SegmentLog(run_dir)
        if env.is_main:
            resumed = self.resume_from.tag if self.resume_from else None
            self.segments.start(resumed, env.world_size, cfg.data.batch_size, cfg.deepspeed.grad_accum)
        self.universal = self.checkpointer.prepare_universal(self.resume_from, cfg.watchdog.phase_timeout_s)
        ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.data.batch_size, env.world_size)
        if self.universal:
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine = initialize(self.stage.model, self.stage.optimizer(), ds_config)
        self.optimizer_step = OptimizerStep(cfg, env, self.stage, self.engine)

        self.step = 0
        self.loop_state = LoopState(restarts=self.segments.restarts() if env.is_main else 0)
        self.tracker = Tracker(run_dir, cfg.tracking.tracking_uri, cfg.tracking.experiment, enabled=env.is_main)
        self.logger = MetricsLogger(run_dir, self.tracker, schedule.total, cfg.tracking.log_every, env.is_main)
        self.watchdog = StepWatchdog(cfg.watchdog, run_dir, env.rank)
        self.profiler = StepProfiler(cfg.tracking.profile_steps, run_dir, env, self.tracker, self.watchdog)
        self.system_metrics: SystemMetrics | None = None
        self.ledger: SampleLedger | None = None
        self.batches: Generator[list[Batch], None, None] | None = None
        self.started = time.perf_counter()
        self.eval_pending = False
        """A preemption stopped the evaluation of the checkpoint's step: the resumed run evaluates it first."""
        self.interval = Interval(env.device)
        """The losses of the current log interval; saved with each checkpoint, so that a run resumed inside an
        interval logs (and tests for a spike) the same mean as the uninterrupted run."""

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any: engine, loader position, stage, recovery and loop state."""
        if self.resume_from is None:
            return
        state = self._load(self.resume_from, universal=self.universal)
        self.recovery.load_state_dict(state)
        self.loop_state = LoopState.resumed(state.get("loop", {}), self.loop_state.restarts)
        self.eval_pending = bool(state.get("eval_pending", False))
        if "interval" in state:
            self.interval.totals.copy_(torch.tensor(state["interval"], dtype=torch.float64))
        if self.recovery.continue_rollback(self.resume_from, self.stage.loader):
            self.interval.totals.zero_()  # a rollback follows a log point: its interval is empty
        if self.env.is_main:
            self.schedule.check_resumed(int(state.get("global_batch", self.schedule.global_batch)))
            log.info("resumed from %s at step %d (epoch %d)", self.resume_from.path, self.step, self.stage.loader.epoch)

    def _load(self, info: CheckpointInfo, universal: bool = False) -> dict[str, Any]:
        """Load a checkpoint into the engine (``universal``: its conversion for another world size); restore the
        step, skip count, loader position and stage state."""
        state = self.checkpointer.load(self.engine, info, load_universal=universal)
        self.step = int(state["step"])
        self.recovery.skip_guard.total = int(state.get("skipped_total", 0))
        self.stage.loader.load_state_dict(state["loader"])
        self.stage.load_state_dict(state.get("stage", {}))
        return state

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
            if self.system_metrics is not None:  # its last samples go in before the run ends
                self.system_metrics.close()
            self.tracker.finish(status)
            self.close(failed=status == "FAILED")

    def train(self) -> int:
        """The loop: steps until the total, then the export; a preemption saves and returns the requeue code."""
        schedule = self.schedule
        if self.step >= schedule.total and self.paths.complete():
            if self.env.is_main:
                self._publish()  # a kill came before the export reached MLflow
                log.info("run already complete (%d steps); exports are in %s", self.step, self.paths.export)
            return 0
        cfg, env = self.cfg, self.env
        self.watchdog.start()
        if cfg.tracking.sample_ledger:
            self.ledger = SampleLedger(self.paths.ledger, env, self.step)
        peak = device_peak_flops(env.device, cfg.deepspeed.precision)
        meter = Meter(schedule.global_batch, env.world_size, schedule.total, self.stage.flops, peak)
        self.batches = micro_batch_groups(self.stage.loader, schedule.accum, env.device)
        params = sum(p.numel() for p in self.stage.model.parameters())
        self.checkpointer.check_estimated_window(params, cfg.deepspeed.precision, cfg.deepspeed.zero_stage)
        if self.eval_pending and self._evaluate_or_stop(meter):  # the one a preemption stopped
            return REQUEUE_EXIT_CODE
        while self.step < schedule.total:
            with self.profiler.step(self.step + 1):
                t0 = time.perf_counter()
                group = next(self.batches)
                meter.add(data_s=time.perf_counter() - t0)
                lr = schedule.lr(self.step)
                result = self.optimizer_step(group, self.step, lr)
                self._after_step(group, result)
            meter.exclude(self.profiler.written_seconds())
            if self.logger.due(self.step) or self.recovery.pending is not None:  # and before a rollback
                self._log(group[0].epoch, lr, meter)
            if self.recovery.pending is not None:
                self._roll_back()
                continue
            if evaluation_due(cfg.eval, self.step, schedule) and self._evaluate_or_stop(meter):
                return REQUEUE_EXIT_CODE
            stop, requested = self.preemption.poll(env.device, save_due=self.checkpointer.clock_due())
            if self.checkpointer.due(self.step, schedule.total, requested=stop or requested):
                self.save()
            if stop:
                self._finish_uploads(at_preemption=True)
                return REQUEUE_EXIT_CODE
        self.export()
        self._finish_uploads(at_preemption=False)
        return 0

    def _after_step(self, group: list[Batch], result: StepResult) -> None:
        self.step += 1
        self.watchdog.beat(self.step)
        keys = [key for batch in group for key in batch.keys]
        if self.ledger is not None:
            self.ledger.record(self.step, group[0].epoch, keys)
        faults.at("step", self.step, self.run_dir)
        self.stage.after_step(self.engine, self.step, result.skipped)
        self.recovery.after_step(self.step, keys, result.skipped, self.checkpointer.root)
        self.loop_state.after_step(result)
        self.interval.add(result.loss_sum, result.loss_count, result.grad_norm, result.skipped)

    def _log(self, epoch: int, lr: float, meter: Meter) -> None:
        loader, interval = self.stage.loader, self.interval
        sources = loader.source_names
        self.loop_state.last_loss, served = interval.mean_loss(loader.source_samples if sources else ())
        perf = meter.flush(self.step, self.env.device)
        scalars = {
            "loss": self.loop_state.last_loss,
            "lr": lr,
            "grad_norm": interval.grad_norm_value(),
            "skipped_steps": float(self.recovery.skip_guard.total),
        }
        # samples served per mixture source since the run began, all ranks
        scalars.update({f"samples_{name}": float(n) for name, n in zip(sources, served, strict=True)})
        self.logger.train(self.step, self.schedule.progress(epoch, self.step), scalars, perf)
        self.recovery.after_log(self.step, self.loop_state.last_loss)

    def _evaluate_or_stop(self, meter: Meter) -> bool:
        """Evaluate and log; when a preemption stops the evaluation, save (marking it pending) and return True."""
        t0 = time.perf_counter()
        with self.watchdog.phase("evaluation"):
            evaluation = evaluate(
                self.stage, self.engine, self.step, self.cfg.deepspeed.precision, self.env, self._stop
            )
        seconds = time.perf_counter() - t0
        meter.exclude(seconds)
        self.eval_pending = evaluation.stopped is not None
        if self.eval_pending:
            self.save()  # first; the resumed run evaluates this step again
            self._finish_uploads(at_preemption=True)
            return True
        self.loop_state.evaluation = evaluation.metrics
        self.logger.eval(self.step, evaluation.metrics, seconds, evaluation.artifacts)
        for key, value in evaluation.tags.items():
            self.tracker.set_tag(key, value)
        return False

    def _stop(self) -> bool:
        """Collective, after each evaluation batch: a preemption signal stops the evaluation."""
        faults.at("evaluation", self.step, self.run_dir)
        return self.preemption.should_stop(self.env.device)

    def save(self) -> None:
        """A checkpoint of the engine, this rank's loader, stage and recovery state, and the loop state."""
        rank_state = {
            "loader": self.stage.loader.state_dict(),
            "stage": self.stage.state_dict(),
            **self.recovery.state_dict(),
            "global_batch": self.schedule.global_batch,
            "loop": self.loop_state.to_dict(time.perf_counter() - self.started),
            "eval_pending": self.eval_pending,
            "interval": self.interval.totals.tolist(),  # sync: at saves only
        }
        with self.watchdog.phase("checkpoint save"):
            self.checkpointer.save(self.engine, self.step, rank_state)
        kept = self.checkpointer.complete()
        self.recovery.saved(oldest_kept=kept[0].step if kept else self.step)  # no rollback restores before it

    def _finish_uploads(self, at_preemption: bool) -> None:
        """Let the mirror upload finish (at a preemption, within the warning window); a mirror left behind is
        tagged."""
        left = self.preemption.seconds_left(self.cfg.cluster.signal_delay_s) if at_preemption else None
        with self.watchdog.phase("mirror upload"):
            missing = self.checkpointer.finish_uploads(left, self.cfg.watchdog.phase_timeout_s)
        if missing is not None:
            self.tracker.set_tag("mirror_incomplete", missing)

    def _roll_back(self) -> None:
        """Undo a spike (:meth:`trainer.resilience.recovery.Recovery.roll_back`) with the loader's workers stopped,
        then rewind the ledger and report it."""
        assert self.batches is not None
        self.batches.close()  # stops the loader's workers before its position changes
        record = self.recovery.roll_back(self.checkpointer, self.stage.loader, self._load)
        self.batches = micro_batch_groups(self.stage.loader, self.schedule.accum, self.env.device)
        if record is None:
            return
        if self.ledger is not None:
            self.ledger.rewind(record.restored_step)
        if self.env.is_main:
            rollbacks = self.recovery.rollbacks
            self.tracker.log_rollback(rollbacks.count(), rollbacks.path, record.detected_at_step)

    def export(self) -> None:
        """The stage's weights and ``metrics.json`` (the run's summary) for the next stage: rank 0 writes them with
        full parameters, the others wait."""
        summary = {
            "stage": self.cfg.stage,
            "steps": self.step,
            "skipped_steps": self.recovery.skip_guard.total,
            "loader_samples_skipped": self.stage.loader.stats.skipped,
            "world_sizes": self.segments.world_sizes() if self.env.is_main else [],
            **self.loop_state.summary(time.perf_counter() - self.started),
        }
        out = self.paths.export
        if self.env.is_main:  # an export replaced (a longer schedule) is incomplete until its metrics.json is new
            self.paths.export_metrics.unlink(missing_ok=True)
            self.paths.export_model_id.unlink(missing_ok=True)
        params = sum(p.numel() for p in self.stage.model.parameters())
        with (
            self.watchdog.phase("export"),
            export_space(out, params),
            gathered_parameters(self.stage.model, self.engine),
        ):
            if self.env.is_main:
                self.stage.export(out, summary)
        barrier()
        if self.env.is_main:
            self._publish()
            log.info("done: %d steps, weights and metrics in %s", self.step, out)

    def _publish(self) -> None:
        """The export in MLflow (rank 0): what it reached in the run's description, and the export as a logged
        (and registered) model, unless its id is written already (the last step of publishing)."""
        if not self.tracker.enabled or self.paths.export_model_id.exists():
            return
        summary = json.loads(self.paths.export_metrics.read_text())
        self.tracker.describe_result(int(summary["steps"]), result_line(summary))
        config = self.cfg.model_dump(mode="json")
        self.tracker.log_model(self.paths.export, config, self.cfg.stage, self.step, self.cfg.tracking.register_as)

    def close(self, failed: bool) -> None:
        """Stop the watchdog, the loader workers (they ignore SIGTERM and would block exit), the ledger and the
        signal handlers; tear the process group down (locally only after a failure). After a failure the flag-only
        handlers stay until the process exits: the launcher sends the surviving ranks SIGTERM, which must not kill
        this one before it has recorded why it failed."""
        self.watchdog.stop()
        self.profiler.close()
        if self.batches is not None:
            self.batches.close()
        if self.ledger is not None:
            self.ledger.close()
        if not failed:
            self.preemption.uninstall()
        teardown(self.engine, clean=not failed)

    def _start_tracking(self) -> None:
        cfg, env = self.cfg, self.env
        summary = ""  # rank 0's one-line summary of the run: also the MLflow run's description
        if env.is_main:
            schedule = self.schedule.describe(cfg.data.batch_size, env.world_size)
            summary = f"{cfg.stage} | {self.stage.describe()} | {schedule}"
        self.tracker.start_run(cfg, env.world_size, summary)
        if env.is_main:
            rollbacks = self.recovery.rollbacks
            self.tracker.log_missing_rollbacks(rollbacks.path, [int(r["detected_at_step"]) for r in rollbacks.read()])
        if cfg.tracking.system_metrics:  # every rank: other nodes receive rank 0's run id
            hosts = job_hosts(env.world_size, cfg.cluster.ranks_per_node)
            self.system_metrics = SystemMetrics(cfg.tracking.system_metrics_interval_s, env, self.tracker, hosts)
        if not env.is_main:
            return
        log.info("%s", summary)
        self.tracker.log_metrics({"train/world_size": float(env.world_size)}, self.step)  # one point per segment
        self.profiler.check_range(self.step, self.schedule.total)


def fit_to_world(cfg: TrainConfig, env: DistEnv) -> TrainConfig:
    """The config for the world this segment got: on a node range, the micro-batch and accumulation that keep the
    configured global batch (:meth:`trainer.config.RunConfig.fit_world`), said in the log."""
    fitted = cfg.fit_world(env.world_size)
    if fitted is not cfg and env.is_main:
        c = cfg.cluster
        log.info(
            "%d of %d-%d nodes: micro-batch %d x accumulation %d x %d ranks = global batch %d, as configured",
            env.world_size // c.ranks_per_node, c.min_nodes, c.nodes, fitted.data.batch_size,
            fitted.deepspeed.grad_accum, env.world_size, fitted.deepspeed.global_batch,
        )  # fmt: skip
    return fitted


def train(cfg: TrainConfig, run_dir: Path) -> int:
    """Train (or resume) ``cfg``'s stage in ``run_dir``; returns the exit code (0, or :data:`REQUEUE_EXIT_CODE`)."""
    return Trainer(cfg, run_dir).run()
