"""The training loop every stage shares: resume, steps, logging, evaluation, checkpoints, preemption, export.

A stage (FCMAE pretraining, fine-tuning, detection) supplies what differs through :class:`Stage`: its model,
loader, loss, evaluation and export. :func:`run_stage` does the rest the same way for all of them:

    install preemption flag -> init distributed -> build stage -> find checkpoint -> DeepSpeed engine -> resume
    -> loop: micro-batches -> train_step -> log -> evaluate -> checkpoint (or save and exit on preemption)
    -> export weights and metrics for the next stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from data.sampling import derive_seed
from trainer.checkpoint import Checkpointer
from trainer.config import TrainConfig
from trainer.distributed import DistEnv, any_rank, init_distributed, mean_over_ranks, teardown
from trainer.engine import deepspeed_config, initialize
from trainer.ledger import SampleLedger
from trainer.metrics import FlopCount, Meter, console_line, device_peak_flops
from trainer.optim import lr_at, set_lr
from trainer.preemption import REQUEUE_EXIT_CODE, PreemptionHandler
from trainer.tracking import Tracker, git_commit
from trainer.watchdog import StepWatchdog

log = logging.getLogger(__name__)

TAG_DROP_PATH = 22

Batch = tuple[torch.Tensor, Any, list[str]]
"""One loader batch: images, labels (a tensor, or per-image targets for detection), sample keys."""


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row); the message says why."""


class Stage(Protocol):
    """What a training stage provides to :func:`run_stage`."""

    @property
    def model(self) -> nn.Module:
        """The module the engine trains."""

    @property
    def loader(self) -> Any:
        """Iterable of ``(images, labels)`` with ``len``, ``epoch``, ``last_keys``, ``state_dict``,
        ``load_state_dict``."""

    @property
    def flops(self) -> FlopCount | None:
        """Training FLOPs per sample (for MFU), when the stage can count them."""

    def optimizer(self) -> torch.optim.Optimizer:
        """The client optimizer (AdamW with the stage's parameter groups)."""

    def loss(self, engine: Any, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """Forward one micro-batch through ``engine`` and return the scalar loss."""

    def after_step(self, engine: Any, step: int, skipped: bool) -> None:
        """Called after every optimizer step (EMA updates)."""

    def evaluate(self, engine: Any, step: int) -> Evaluation:
        """Run on every rank (ZeRO-3 gathers parameters); rank 0's result is logged."""

    def export(self, engine: Any, out_dir: Path, summary: dict[str, Any]) -> None:
        """Write the stage's consolidated weights and ``metrics.json`` to ``out_dir`` (every rank calls it)."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state of this rank saved with each checkpoint (beyond the engine and loader)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def describe(self) -> str:
        """One line about the model for the start-up log."""


@dataclass
class Evaluation:
    """Metrics of an evaluation, and files to log with it (``artifact folder -> path``)."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[str, Path]] = field(default_factory=list)


@dataclass
class LoopState:
    """What the loop accumulates over the whole run, saved with every checkpoint so that a requeued run reports
    the whole run (nanochat's single saved loop state)."""

    first_loss: float | None = None
    train_time_s: float = 0.0
    """Wall time of the earlier segments (the current one is added when saving or exporting)."""
    restarts: int = 0

    @classmethod
    def resumed(cls, saved: dict[str, Any]) -> LoopState:
        """The state of a checkpoint, one restart later."""
        first = saved.get("first_loss")
        return cls(
            first_loss=None if first is None else float(first),
            train_time_s=float(saved.get("train_time_s", 0.0)),
            restarts=int(saved.get("restarts", 0)) + 1,
        )

    def to_dict(self, segment_s: float) -> dict[str, Any]:
        """The state as saved (and reported in ``metrics.json``), with the current segment's time added."""
        return {"first_loss": self.first_loss, "train_time_s": self.train_time_s + segment_s, "restarts": self.restarts}


@dataclass
class StepResult:
    """What one optimizer step produced."""

    loss: float
    grad_norm: float
    lr: float
    skipped: bool


class SkipGuard:
    """Counts skipped (non-finite) steps and stops the run after too many in a row."""

    def __init__(self, max_in_row: int) -> None:
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0

    def update(self, skipped: bool, step: int, checkpoint_dir: Path) -> None:
        """Record one step; raise :class:`TrainingError` when ``max_in_row`` steps in a row were skipped."""
        self.in_row = self.in_row + 1 if skipped else 0
        self.total += int(skipped)
        if skipped:
            log.warning("step %d skipped: non-finite loss or gradient (%d in a row)", step, self.in_row)
        if self.in_row >= self.max_in_row:
            raise TrainingError(
                f"{self.in_row} steps in a row had a non-finite loss or gradient (last: step {step}); lower "
                "optim.base_lr, set optim.grad_clip, or use deepspeed.precision=fp32. The last complete "
                f"checkpoint is in {checkpoint_dir}"
            )


def autocast(cfg: TrainConfig, env: DistEnv) -> Any:
    """bf16 autocast when the run is bf16 (CUDA or CPU: DeepSpeed holds the weights in bf16, the loader gives fp32
    images); a disabled context otherwise."""
    if cfg.deepspeed.precision == "bf16":
        return torch.autocast(env.device.type, dtype=torch.bfloat16)
    return torch.autocast(env.device.type, enabled=False)


def train_step(
    engine: Any, stage: Stage, micro_batches: list[Batch], lr: float, step: int, cfg: TrainConfig, env: DistEnv
) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches.

    A non-finite loss on any rank poisons the step on every rank (the loss is multiplied by NaN, so every rank
    runs the same collectives); DeepSpeed then sees non-finite gradients and skips the update. Drop path draws
    come from (seed, step, rank, micro-batch), so a resumed run draws what the uninterrupted one drew.
    """
    set_lr(engine.optimizer, lr)
    skipped_before = engine.skipped_steps
    losses: list[float] = []
    poisoned = False
    for micro, batch in enumerate(micro_batches):
        torch.manual_seed(derive_seed(cfg.seed, TAG_DROP_PATH, step, env.rank, micro))
        with autocast(cfg, env):
            loss = stage.loss(engine, batch, step, micro)
        if any_rank(not bool(torch.isfinite(loss)), env.device):
            poisoned = True
            loss = loss * float("nan")
        else:
            losses.append(float(loss.detach()))
        engine.backward(loss)
        if micro == len(micro_batches) - 1 and cfg.deepspeed.zero_stage == 0 and _grads_nonfinite(engine, env):
            # ZeRO-0 applies the client optimizer as is: drop the gradients so that AdamW skips every parameter.
            poisoned = True
            for param in engine.module.parameters():
                param.grad = None
        engine.step()
    skipped = poisoned or engine.skipped_steps > skipped_before
    norm = engine.get_global_grad_norm()
    grad_norm = float(norm) if norm is not None and not skipped else float("nan")
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return StepResult(loss=mean_loss, grad_norm=grad_norm, lr=lr, skipped=skipped)


def _grads_nonfinite(engine: Any, env: DistEnv) -> bool:
    flags = [torch.isfinite(p.grad).all() for p in engine.module.parameters() if p.grad is not None]
    return any_rank(bool(flags) and not bool(torch.stack(flags).all()), env.device)


def micro_batch_groups(loader: Any, accum: int, env: DistEnv) -> Generator[tuple[int, list[Batch]], None, None]:
    """Endless (epoch, micro-batches of one step); epochs advance as the loader finishes them. A partial group at
    the end of an epoch is dropped (every rank has the same batch count, so all drop it)."""
    while True:
        epoch = loader.epoch
        group: list[Batch] = []
        for images, labels in loader:
            group.append((images.to(env.device, non_blocking=True), labels, list(loader.last_keys)))
            if len(group) == accum:
                yield epoch, group
                group = []


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: the epochs, capped by ``schedule.max_steps``."""
    steps = math.ceil(cfg.schedule.epochs * steps_per_epoch)
    return min(steps, cfg.schedule.max_steps) if cfg.schedule.max_steps else steps


def run_stage(cfg: TrainConfig, run_dir: Path, build: Callable[[TrainConfig, DistEnv, Path], Stage]) -> int:
    """Train (or resume) a stage in ``run_dir``; returns the exit code (0, or :data:`REQUEUE_EXIT_CODE`)."""
    preemption = PreemptionHandler().install()  # first: a signal during start-up must not kill the rank
    env = init_distributed()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    stage = build(cfg, env, run_dir)
    accum = cfg.deepspeed.grad_accum
    steps_per_epoch = len(stage.loader) // accum
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(stage.loader)} batches per epoch cannot fill one step of deepspeed.grad_accum={accum}: "
            "lower data.batch_size or deepspeed.grad_accum"
        )
    total = total_steps(cfg, steps_per_epoch)
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    global_batch = cfg.global_batch(env.world_size)
    peak_lr = cfg.lr(env.world_size)

    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, env)
    resume = checkpointer.find_latest()
    universal = resume is not None and checkpointer.needs_universal(resume)
    if universal and resume is not None:
        checkpointer.prepare_universal(resume, timeout_s=cfg.watchdog.phase_timeout_s)
    ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.data.batch_size, env.world_size)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine = initialize(stage.model, stage.optimizer(), ds_config)

    step = 0
    skip_guard = SkipGuard(cfg.schedule.max_skipped_steps)
    loop_state = LoopState()
    if resume is not None:
        state = checkpointer.load(engine, resume, load_universal=universal)
        step = int(state["step"])
        skip_guard.total = int(state.get("skipped_total", 0))
        loop_state = LoopState.resumed(state.get("loop", {}))
        if int(state.get("global_batch", global_batch)) != global_batch and env.is_main:
            log.warning(
                "global batch changed from %d to %d on resume: the lr is rescaled and steps per epoch change",
                int(state["global_batch"]), global_batch,
            )  # fmt: skip
        stage.loader.load_state_dict(state["loader"])
        stage.load_state_dict(state.get("stage", {}))
        if env.is_main:
            log.info("resumed from %s at step %d (epoch %d)", resume.path, step, stage.loader.epoch)

    tracker = Tracker(run_dir, cfg.tracking.tracking_uri, cfg.tracking.experiment, enabled=env.is_main)
    tracker.start(params=cfg.model_dump(mode="json"), tags=_tags(cfg, env), run_name=f"{cfg.name}-{run_dir.name}")
    if env.is_main:
        if tracker.restart_count == 0:
            tracker.log_config(cfg.model_dump(mode="json"))
        log.info(
            "%s | %s | world %d | global batch %d (%d x %d accum x %d ranks) | lr %.3g | %d steps/epoch | %d steps",
            cfg.stage, stage.describe(), env.world_size, global_batch, cfg.data.batch_size, accum, env.world_size,
            peak_lr, steps_per_epoch, total,
        )  # fmt: skip

    if step >= total and (run_dir / "export" / "metrics.json").exists():
        if env.is_main:
            log.info("run already complete (%d steps); exports are in %s", step, run_dir / "export")
        tracker.finish("FINISHED")
        preemption.uninstall()
        teardown(engine)
        return 0

    watchdog = StepWatchdog(cfg.watchdog, run_dir, env.rank).start()

    ledger = SampleLedger(run_dir / "ledger", env, step) if cfg.tracking.sample_ledger else None
    meter = Meter(
        global_batch, env.world_size, total, stage.flops, device_peak_flops(env.device, cfg.deepspeed.precision)
    )
    groups = micro_batch_groups(stage.loader, accum, env)
    losses: list[float] = []
    logged_loss = float("nan")
    eval_metrics: dict[str, float] = {}
    exit_code = 0
    failed = True
    started = time.perf_counter()
    try:
        while step < total:
            t0 = time.perf_counter()
            epoch, group = next(groups)
            t1 = time.perf_counter()
            lr = lr_at(step, total, warmup, peak_lr, cfg.optim.min_lr)
            result = train_step(engine, stage, group, lr, step, cfg, env)
            step += 1
            watchdog.beat(step)
            if ledger is not None:
                ledger.record(step, epoch, [key for _, _, keys in group for key in keys])
            stage.after_step(engine, step, result.skipped)
            meter.add(t1 - t0)
            skip_guard.update(result.skipped, step, checkpointer.root)
            if not math.isnan(result.loss):
                losses.append(result.loss)
                loop_state.first_loss = result.loss if loop_state.first_loss is None else loop_state.first_loss
            if step % cfg.tracking.log_every == 0 or step == total:
                progress = epoch + (step % steps_per_epoch) / steps_per_epoch
                logged_loss = _log_interval(
                    step, total, progress, result, losses, skip_guard.total, meter, tracker, env
                )
                losses = []
            epoch_end = cfg.tracking.eval_each_epoch and step % steps_per_epoch == 0
            if step % cfg.tracking.eval_every == 0 or step == total or epoch_end:
                with watchdog.phase("evaluation"):
                    evaluation = stage.evaluate(engine, step)
                eval_metrics = evaluation.metrics
                if env.is_main and eval_metrics:
                    tracker.log_metrics(eval_metrics, step)
                    log.info("eval step %d: %s", step, " | ".join(f"{k} {v:.4g}" for k, v in eval_metrics.items()))
                for folder, path in evaluation.artifacts if env.is_main else []:
                    tracker.log_artifact(path, folder)
            stop = preemption.should_stop(env.device)
            if stop or step % cfg.checkpoint.every_steps == 0 or step == total:
                rank_state = {
                    "loader": stage.loader.state_dict(),
                    "stage": stage.state_dict(),
                    "skipped_total": skip_guard.total,
                    "global_batch": global_batch,
                    "loop": loop_state.to_dict(time.perf_counter() - started),
                }
                with watchdog.phase("checkpoint save"):
                    checkpointer.save(engine, step, rank_state)
            if stop:
                exit_code = REQUEUE_EXIT_CODE
                break
        if exit_code == 0:
            summary = {
                "stage": cfg.stage,
                "steps": step,
                "final_loss": logged_loss,
                "skipped_steps": skip_guard.total,
                **loop_state.to_dict(time.perf_counter() - started),
                "loader_samples_skipped": getattr(getattr(stage.loader, "stats", None), "skipped", 0),
                **eval_metrics,
            }
            with watchdog.phase("export"):
                stage.export(engine, run_dir / "export", summary)
            if env.is_main:
                tracker.log_artifact(run_dir / "export" / "model.safetensors", "export")
                tracker.log_artifact(run_dir / "export" / "metrics.json", "export")
                log.info("done: %d steps, weights and metrics in %s", step, run_dir / "export")
        tracker.finish("FINISHED" if exit_code == 0 else "KILLED")
        failed = False
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        watchdog.stop()
        groups.close()  # shuts the dataloader workers down now (they ignore SIGTERM and would block exit)
        if ledger is not None:
            ledger.close()
        preemption.uninstall()
        teardown(engine, clean=not failed)
    return exit_code


def _tags(cfg: TrainConfig, env: DistEnv) -> dict[str, str]:
    per_node = torch.cuda.device_count() if env.device.type == "cuda" else cfg.cluster.cpu_ranks_per_node
    return {
        "git_commit": git_commit(),
        "world_size": str(env.world_size),
        "hosts": str(int(os.environ.get("SLURM_JOB_NUM_NODES", max(1, env.world_size // max(1, per_node))))),
        "slurm_job_id": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or "none",
        "stage": cfg.stage,
    }


def _log_interval(
    step: int,
    total: int,
    progress: float,
    result: StepResult,
    losses: list[float],
    skipped_total: int,
    meter: Meter,
    tracker: Tracker,
    env: DistEnv,
) -> float:
    """Console line, ``metrics.jsonl`` and MLflow for the steps since the last call; returns the mean loss."""
    local_loss = sum(losses) / len(losses) if losses else float("nan")
    (loss,) = mean_over_ranks([local_loss], env.device)
    perf = meter.flush(step, env.device)
    if not env.is_main:
        return loss
    scalars = {"loss": loss, "lr": result.lr, "grad_norm": result.grad_norm, "skipped_steps": float(skipped_total)}
    log.info(console_line(step, total, progress, scalars, perf))
    record = {"step": step, "epoch": progress, **scalars, **perf}
    with open(tracker.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tracker.log_metrics({**{k: v for k, v in scalars.items() if math.isfinite(v)}, **perf, "epoch": progress}, step)
    return loss
