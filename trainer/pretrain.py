"""FCMAE pretraining: streaming shards -> masked ConvNeXt V2 -> DeepSpeed, with checkpoints, metrics and MLflow.

One optimizer step (:func:`train_step`) reads like the paper: for each micro-batch draw the masks, compute the
masked-patch loss, agree across ranks that it is finite, backward; then step. Everything random that shapes
training is derived from the run seed and the position in the run (masks from the sample key and epoch, drop
path from the step and rank), so a resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from data.sampling import derive_seed
from models.fcmae import FCMAE
from models.masking import random_mask
from trainer.checkpoint import Checkpointer, CheckpointInfo
from trainer.config import TrainConfig
from trainer.distributed import DistEnv, any_rank, barrier, init_distributed, mean_over_ranks, teardown
from trainer.engine import deepspeed_config, initialize
from trainer.fcmae_eval import feature_cosine_distance, save_reconstructions
from trainer.metrics import Meter, console_line, count_fcmae_flops, device_peak_flops
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.preemption import REQUEUE_EXIT_CODE, PreemptionHandler
from trainer.run_loader import build_train_loader
from trainer.tracking import Tracker, git_commit

log = logging.getLogger(__name__)

TAG_MASK = 21
TAG_DROP_PATH = 22


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row); the message says why."""


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


def sample_masks(keys: list[str], seed: int, epoch: int, num_patches: int, ratio: float) -> torch.Tensor:
    """One mask per sample, drawn from (seed, epoch, sample key): the same on any world size and after resume."""
    masks = []
    for key in keys:
        gen = torch.Generator().manual_seed(derive_seed(seed, TAG_MASK, epoch, zlib.crc32(key.encode())))
        masks.append(random_mask(1, num_patches, ratio, gen))
    return torch.cat(masks)


def train_step(
    engine: Any,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    step: int,
    cfg: TrainConfig,
    env: DistEnv,
) -> StepResult:
    """One optimizer step over ``grad_accum`` micro-batches of (images, masks).

    A non-finite loss on any rank poisons the step on every rank (the loss is multiplied by NaN, so every rank
    runs the same collectives); DeepSpeed then sees non-finite gradients and skips the update.
    """
    set_lr(engine.optimizer, lr)
    skipped_before = engine.skipped_steps
    losses: list[float] = []
    poisoned = False
    for micro, (imgs, masks) in enumerate(micro_batches):
        torch.manual_seed(derive_seed(cfg.seed, TAG_DROP_PATH, step, env.rank, micro))
        with _autocast(cfg, env):
            loss, _, _ = engine(imgs, masks)
        nonfinite = any_rank(not bool(torch.isfinite(loss)), env.device)
        if nonfinite:
            poisoned = True
            loss = loss * float("nan")
        else:
            losses.append(float(loss.detach()))
        engine.backward(loss)
        if micro == len(micro_batches) - 1 and cfg.deepspeed.zero_stage == 0 and _grads_nonfinite(engine):
            # ZeRO-0 applies the client optimizer as is: drop the gradients so that AdamW skips every parameter.
            poisoned = True
            for param in engine.module.parameters():
                param.grad = None
        engine.step()
    skipped = poisoned or engine.skipped_steps > skipped_before
    grad_norm = engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None and not skipped else float("nan")
    return StepResult(
        loss=sum(losses) / max(len(losses), 1) if losses else float("nan"), grad_norm=grad_norm, lr=lr, skipped=skipped
    )


def _grads_nonfinite(engine: Any) -> bool:
    flags = [torch.isfinite(p.grad).all() for p in engine.module.parameters() if p.grad is not None]
    return any_rank(bool(flags) and not bool(torch.stack(flags).all()), torch.device("cpu"))


def _autocast(cfg: TrainConfig, env: DistEnv) -> Any:
    if cfg.deepspeed.precision == "bf16" and env.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(env.device.type, enabled=False)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: the epochs, capped by ``schedule.max_steps``."""
    steps = math.ceil(cfg.schedule.epochs * steps_per_epoch)
    return min(steps, cfg.schedule.max_steps) if cfg.schedule.max_steps else steps


def _micro_batches(
    loader: Any, cfg: TrainConfig, env: DistEnv, num_patches: int
) -> Iterator[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Endless (epoch, micro-batches of one step) with masks attached; epochs advance as the loader ends them."""
    accum = cfg.deepspeed.grad_accum
    while True:
        epoch = loader.epoch
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        for imgs, _labels in loader:
            masks = sample_masks(loader.last_keys, cfg.seed, epoch, num_patches, cfg.model.mask_ratio)
            imgs = imgs.to(env.device, non_blocking=True)
            if cfg.model.channels_last and env.device.type == "cuda":
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            group.append((imgs, masks.to(env.device)))
            if len(group) == accum:
                yield epoch, group
                group = []
        # A partial group at the end of an epoch is dropped: every rank has the same batch count.


def export_weights(model: FCMAE, engine: Any, run_dir: Path, metrics: dict[str, Any], env: DistEnv) -> None:
    """Consolidated fp32 weights for the next stage: ``export/model.safetensors`` (the encoder in the layout
    ``build(size, num_classes=0)`` loads) and ``export/fcmae.safetensors`` (encoder + decoder)."""
    from deepspeed import zero

    params = list(model.parameters())
    # ZeRO-3 partitions parameters: gather them on every rank (a collective), then rank 0 writes.
    gather = zero.GatheredParameters(params, modifier_rank=None) if engine.zero_optimization_stage() == 3 else None
    with gather if gather is not None else _null():
        if env.is_main:
            out = run_dir / "export"
            out.mkdir(parents=True, exist_ok=True)
            encoder = {k: v.detach().float().cpu().contiguous() for k, v in model.encoder_state_dict().items()}
            full = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(encoder, str(out / "model.safetensors"), metadata={"size": model.size, "stage": "pretrain"})
            save_file(full, str(out / "fcmae.safetensors"), metadata={"size": model.size, "stage": "pretrain"})
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    barrier()


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def run_pretrain(cfg: TrainConfig, run_dir: Path) -> int:
    """Train (or resume) FCMAE in ``run_dir``; returns the process exit code (0, or requeue after preemption)."""
    preemption = PreemptionHandler().install()  # first: a signal during start-up must not kill the rank
    env = init_distributed()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = FCMAE(
        cfg.model.size,
        mask_ratio=cfg.model.mask_ratio,
        decoder_dim=cfg.model.decoder_dim,
        decoder_depth=cfg.model.decoder_depth,
        norm_pix_loss=cfg.model.norm_pix_loss,
        backend=cfg.model.backend,
        drop_path=cfg.model.drop_path,
    ).to(env.device)
    if cfg.model.channels_last and env.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    flops = count_fcmae_flops(model, cfg.data.image_size, env.device)
    loader = build_train_loader(cfg, env)
    accum = cfg.deepspeed.grad_accum
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(loader)} batches per epoch cannot fill one step of deepspeed.grad_accum={accum}: "
            "lower data.batch_size or grad_accum"
        )
    total = total_steps(cfg, steps_per_epoch)
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    global_batch = cfg.global_batch(env.world_size)
    peak_lr = cfg.lr(env.world_size)

    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, env)
    resume: CheckpointInfo | None = checkpointer.find_latest()
    universal = resume is not None and resume.world_size != env.world_size
    if universal and resume is not None:
        checkpointer.prepare_universal(resume)
    ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, cfg.data.batch_size, env.world_size)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    engine = initialize(model, build_optimizer(model, cfg.optim), ds_config)

    step = 0
    skip_guard = SkipGuard(cfg.schedule.max_skipped_steps)
    if resume is not None:
        state = checkpointer.load(engine, resume, load_universal=universal)
        step = int(state["step"])
        skip_guard.total = int(state.get("skipped_total", 0))
        if int(state.get("global_batch", global_batch)) != global_batch and env.is_main:
            log.warning(
                "global batch changed from %d to %d on resume: the lr is rescaled and steps per epoch change",
                int(state["global_batch"]), global_batch,
            )  # fmt: skip
        loader.load_state_dict(state["loader"])
        if env.is_main:
            log.info("resumed from %s at step %d (epoch %d)", resume.path, step, loader.epoch)

    tracker = Tracker(run_dir, cfg.tracking.tracking_uri, cfg.tracking.experiment, enabled=env.is_main)
    tracker.start(
        params=cfg.model_dump(mode="json"),
        tags={
            "git_commit": git_commit(),
            "world_size": str(env.world_size),
            "hosts": str(max(1, env.world_size // max(1, torch.cuda.device_count() or cfg.cluster.cpu_ranks_per_node))),
            "slurm_job_id": _slurm_job_id(),
            "stage": cfg.stage,
        },
        run_name=f"{cfg.name}-{run_dir.name}",
    )
    if env.is_main and tracker.restart_count == 0:
        tracker.log_artifact(run_dir / "config.yaml")
    if env.is_main:
        log.info(
            "FCMAE %s | world %d | global batch %d (%d x %d accum x %d ranks) | lr %.3g | %d steps/epoch | "
            "%d steps | encoder %.2f GFLOPs/img train (dense-equivalent %.2f)",
            cfg.model.size, env.world_size, global_batch, cfg.data.batch_size, accum, env.world_size, peak_lr,
            steps_per_epoch, total, flops.masked / 1e9, flops.dense / 1e9,
        )  # fmt: skip

    meter = Meter(global_batch, env.world_size, total, flops, device_peak_flops(env.device))
    num_patches = (cfg.data.image_size // model.patch_size) ** 2
    batches = _micro_batches(loader, cfg, env, num_patches)
    eval_batch: tuple[torch.Tensor, torch.Tensor] | None = None
    losses: list[float] = []
    first_loss: float | None = None
    logged_loss = float("nan")
    exit_code = 0
    started = time.perf_counter()
    try:
        while step < total:
            t0 = time.perf_counter()
            epoch, group = next(batches)
            t1 = time.perf_counter()
            if eval_batch is None:
                eval_batch = group[0]
            result = train_step(engine, group, lr_at(step, total, warmup, peak_lr, cfg.optim.min_lr), step, cfg, env)
            step += 1
            meter.add(t1 - t0, time.perf_counter() - t1)
            skip_guard.update(result.skipped, step, checkpointer.root)
            if not math.isnan(result.loss):
                losses.append(result.loss)
                first_loss = first_loss if first_loss is not None else result.loss
            if step % cfg.tracking.log_every == 0 or step == total:
                logged_loss = _log_interval(
                    step, total, epoch, steps_per_epoch, result, losses, skip_guard.total, meter, tracker, env
                )
                losses = []
            if eval_batch is not None and (step % cfg.tracking.eval_every == 0 or step == total):
                _evaluate(model, engine, eval_batch, step, run_dir, tracker, cfg, env)
            stop = preemption.should_stop(env.device)
            if stop or step % cfg.checkpoint.every_steps == 0 or step == total:
                checkpointer.save(
                    engine,
                    step,
                    {
                        "loader": loader.state_dict(),
                        "skipped_total": skip_guard.total,
                        "epoch": epoch,
                        "global_batch": global_batch,
                    },
                )
            if stop:
                exit_code = REQUEUE_EXIT_CODE
                break
        if exit_code == 0:
            final = {
                "stage": "pretrain",
                "steps": step,
                "first_loss": first_loss,
                "final_loss": logged_loss,
                "skipped_steps": skip_guard.total,
                "wall_time_s": time.perf_counter() - started,
                "samples_skipped_by_loader": getattr(getattr(loader, "stats", None), "skipped", 0),
            }
            export_weights(model, engine, run_dir, final, env)
            if env.is_main:
                tracker.log_metrics({"final_loss": logged_loss}, step)
                tracker.log_artifact(run_dir / "export" / "model.safetensors", "export")
                tracker.log_artifact(run_dir / "export" / "metrics.json", "export")
                log.info("done: %d steps, exported to %s", step, run_dir / "export")
        tracker.finish("FINISHED" if exit_code == 0 else "KILLED")
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        preemption.uninstall()
        teardown(engine)
    return exit_code


def _slurm_job_id() -> str:
    import os

    return os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or "none"


def _log_interval(
    step: int,
    total: int,
    epoch: int,
    steps_per_epoch: int,
    result: StepResult,
    losses: list[float],
    skipped_total: int,
    meter: Meter,
    tracker: Tracker,
    env: DistEnv,
) -> float:
    """Console line, metrics.jsonl and MLflow for the steps since the last call; returns the mean loss."""
    local_loss = sum(losses) / len(losses) if losses else float("nan")
    (loss,) = mean_over_ranks([local_loss], env.device)
    perf = meter.flush(step, env.device)
    if not env.is_main:
        return loss
    scalars = {"loss": loss, "lr": result.lr, "grad_norm": result.grad_norm, "skipped_steps": float(skipped_total)}
    progress = epoch + (step % steps_per_epoch) / steps_per_epoch if steps_per_epoch else float(epoch)
    log.info(console_line(step, total, progress, scalars, perf))
    record = {"step": step, "epoch": progress, **scalars, **perf}
    with open(tracker.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tracker.log_metrics({**{k: v for k, v in scalars.items() if math.isfinite(v)}, **perf, "epoch": progress}, step)
    return loss


@torch.no_grad()
def _evaluate(
    model: FCMAE,
    engine: Any,
    batch: tuple[torch.Tensor, torch.Tensor],
    step: int,
    run_dir: Path,
    tracker: Tracker,
    cfg: TrainConfig,
    env: DistEnv,
) -> None:
    """Reconstructions of a fixed batch and the feature cosine-distance statistic (all ranks run it: ZeRO-3)."""
    from deepspeed import zero

    imgs, masks = batch
    was_training = model.training
    model.eval()
    params = list(model.parameters())
    gather = zero.GatheredParameters(params, modifier_rank=None) if engine.zero_optimization_stage() == 3 else _null()
    with gather, _autocast(cfg, env):
        _, pred, _ = model(imgs[:8], masks[:8])
        features = model.encoder.forward_features(imgs[:8])
    model.train(was_training)
    if not env.is_main:
        return
    distance = feature_cosine_distance(features)
    path = save_reconstructions(model, imgs[:8], masks[:8], pred, run_dir / "images" / f"recon_{step:08d}.png")
    tracker.log_metrics({"feature_cosine_distance": distance}, step)
    tracker.log_artifact(path, "reconstructions")
    log.info("eval step %d: feature cosine distance %.4f, reconstructions in %s", step, distance, path)
