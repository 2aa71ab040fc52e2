"""``--dry-run``: what a launch would do, computed without submitting anything.

Batch arithmetic, learning rate, steps, parameter count, and a per-device memory estimate for the chosen ZeRO
stage. Parameters are counted on the meta device (no allocation); activations are the bytes autograd saves for
backward in one FCMAE step of the configured per-device batch, measured on the meta device with the configured
encoder backend, weights saved for backward left out (they are the parameters, counted once); an upper bound, as a
tensor saved by several ops is counted each time.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cluster.slurm import sbatch_options
from data.synthetic import parse_synthetic_url
from models.convnextv2 import ConvNeXtV2Encoder
from models.fcmae import FCMAE
from models.masking import random_mask
from trainer.config import ConfigError, PretrainConfig, TrainConfig
from trainer.observability.metrics import PEAK_FLOPS, flop_counter, peak_flops
from trainer.resilience.recovery import read_records
from trainer.run_dir import RunDir
from trainer.stages import build_model

IMAGENET_TRAIN = 1_281_167
COCO_TRAIN2017 = 118_287
GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        """Sum of the parts (allocator fragmentation and communication buckets come on top)."""
        return self.params + self.grads + self.optimizer + self.activations


@dataclass(frozen=True)
class Plan:
    """Everything ``--dry-run`` prints."""

    world_size: int
    nodes: int
    ranks_per_node: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    lr: float
    dataset_size: int
    dataset_note: str
    steps_per_epoch: int
    total_steps: int
    num_params: int
    params_note: str
    memory: MemoryEstimate
    sbatch: list[str]
    node_rows: list[NodeCountRow]
    """With a node range (``cluster.min_nodes``), one row per node count it may run on."""
    flops_per_sample: float | None
    """Training FLOPs (forward + backward) of one sample, counted on the meta device; None for detection."""
    mfu: tuple[float, str]
    """The utilization the time estimate assumes, and where it comes from."""


@dataclass(frozen=True)
class NodeCountRow:
    """How a run on a node range runs on one of its node counts: the global batch stays, the split changes (or the
    count cannot make it, and a job started on it is refused)."""

    nodes: int
    world_size: int
    split: tuple[int, int] | None
    """(micro-batch, accumulation), None when the count cannot make the global batch."""
    memory: MemoryEstimate | None


def dataset_size(cfg: TrainConfig, run_dir: Path | None = None) -> tuple[int, str]:
    """Samples per epoch from local manifests (or local indexes, made in memory for shards without one); remote
    sets are not contacted by a dry run."""
    spec = cfg.data.train_url
    synthetic = parse_synthetic_url(spec) if isinstance(spec, str) else None
    if synthetic is not None:
        return synthetic, "synthetic"
    from data.manifest import data_specs

    urls = data_specs(spec)
    if any("://" in url and not url.startswith("file://") for url in urls):
        where = ", ".join(url for url in urls if "://" in url and not url.startswith("file://"))
        if cfg.stage == "detection":
            return COCO_TRAIN2017, f"{where} not contacted by a dry run: assuming COCO train2017"
        return IMAGENET_TRAIN, f"{where} not contacted by a dry run: assuming ImageNet-1k train"
    total, notes = 0, list[str]()
    for url in urls:
        count, note = _local_size(url.removeprefix("file://"), run_dir)
        total, notes = total + count, [*notes, note]
    return total, "; ".join(notes)


def _local_size(spec: str, run_dir: Path | None) -> tuple[int, str]:
    """Samples of one local shard set: from its manifest or cached index, else indexed in memory."""
    from data.index_shards import expand_source, index_shards
    from data.manifest import resolve_shards
    from data.storage import MissingShardError

    try:
        return resolve_shards(spec, index_dir=str(RunDir(run_dir).index) if run_dir else None).num_samples, spec
    except MissingShardError:
        pass  # no manifest yet: count from the tar headers, as the launch will
    try:
        shards = expand_source(spec)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.train_url: {spec}: {exc}") from None
    manifest = index_shards(shards, progress=False)
    return manifest.num_samples, f"{len(shards)} shards of {spec} indexed in memory (the launch caches the index)"


def planned_model(cfg: TrainConfig) -> nn.Module:
    """The stage's own model (:func:`trainer.stages.build_model`), on the meta device: nothing is allocated.
    MinkowskiEngine cannot run on the meta device; the gather backend saves the same per-cell activations."""
    if isinstance(cfg, PretrainConfig) and cfg.model.backend == "minkowski":
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backend": "gather"})})
    with torch.device("meta"):
        return build_model(cfg)


PARAMS_NOTE = {"pretrain": "encoder + decoder", "finetune": "classifier", "detection": "backbone, FPN and heads"}


def count_parameters(cfg: TrainConfig) -> tuple[int, str]:
    """Trainable parameters of the stage's model (counted on the meta device) and what they cover."""
    return sum(p.numel() for p in planned_model(cfg).parameters()), PARAMS_NOTE[cfg.stage]


def activation_bytes(cfg: TrainConfig, batch: int) -> float | None:
    """Bytes saved for backward by one forward of ``batch`` images (fp32), measured on the meta device with the
    run's model; None for detection (torchvision's detector does data-dependent work that the meta device cannot
    run). With activation checkpointing a checkpointed stage keeps only its blocks' inputs, and backward recomputes
    one block at a time: the largest checkpointed block's own activations are added for that moment."""
    if cfg.stage == "detection":
        return None
    model = planned_model(cfg)
    encoder = model.encoder if isinstance(model, FCMAE) else model
    assert isinstance(encoder, ConvNeXtV2Encoder)
    flags = [stage.grad_checkpointing for stage in encoder.iter_stages()]
    kept, _ = _saved_bytes(model, encoder, cfg.data.image_size, batch)
    if not any(flags):
        return kept
    encoder.set_grad_checkpointing(False)
    _, per_block = _saved_bytes(model, encoder, cfg.data.image_size, batch)
    return kept + max(saved for (stage, _), saved in per_block.items() if flags[stage])


def _saved_bytes(
    model: nn.Module, encoder: ConvNeXtV2Encoder, size: int, batch: int
) -> tuple[float, dict[tuple[int, int], float]]:
    """Bytes autograd saves in one forward on the meta device, in all and per encoder block (stage, block). The
    weights that ops save (or views of them) are the model's parameters, not activations: they are left out."""
    images = torch.empty(batch, 3, size, size, device="meta")
    weights = {id(p) for p in model.parameters()}
    total = 0.0
    per_block: dict[tuple[int, int], float] = {}
    current: list[tuple[int, int] | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if id(t) not in weights and (t._base is None or id(t._base) not in weights):
            nbytes = t.numel() * t.element_size()
            total += nbytes
            if current[0] is not None:
                per_block[current[0]] = per_block.get(current[0], 0.0) + nbytes
        return t

    def enter(where: tuple[int, int] | None) -> Callable[..., None]:
        def hook(*_: object) -> None:
            current[0] = where

        return hook

    handles = []  # a block runs from its depthwise conv (first in every backend) to its last linear
    for i, stage in enumerate(encoder.iter_stages()):
        for j, block in enumerate(stage.iter_blocks()):
            handles.append(block.dwconv.register_forward_pre_hook(enter((i, j))))
            handles.append(block.pwconv2.register_forward_hook(enter(None)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if isinstance(model, FCMAE):
                grid = size // model.patch_size
                mask = random_mask(batch, grid * grid, model.mask_ratio, torch.Generator().manual_seed(0))
                model(images, mask.to("meta"), visible=model.visible_patches(grid, grid))
            else:
                model(images)
    finally:
        for handle in handles:
            handle.remove()
    return total, per_block


def memory_estimate(cfg: TrainConfig, num_params: int, world: int) -> MemoryEstimate:
    """Model states per device under ZeRO (DeepSpeed's accounting) plus measured activations.

    bf16/fp16: bf16 weights (2 B) and gradients (2 B), fp32 master weights + Adam moments (12 B). fp32: 4 + 4 + 8 B.
    ZeRO-1 partitions optimizer states over the data-parallel ranks, ZeRO-2 also gradients, ZeRO-3 also weights.
    """
    p, stage = float(num_params), cfg.deepspeed.zero_stage
    half = cfg.deepspeed.precision in ("bf16", "fp16")
    weight_b, grad_b, optim_b = (2, 2, 12) if half else (4, 4, 8)
    measured = activation_bytes(cfg, cfg.data.batch_size)
    # Autocast keeps most saved tensors in bf16.
    acts = float("nan") if measured is None else measured * (0.5 if half else 1.0)
    offload = cfg.deepspeed.offload_optimizer
    return MemoryEstimate(
        params=p * weight_b / (world if stage >= 3 else 1),
        grads=p * grad_b / (world if stage >= 2 else 1),
        optimizer=0.0 if offload else p * optim_b / (world if stage >= 1 else 1),
        activations=acts,
    )


def node_rows(cfg: TrainConfig, num_params: int) -> list[NodeCountRow]:
    """A row per node count of ``cfg``'s node range (none without one), each with the memory of its micro-batch."""
    if cfg.cluster.min_nodes is None:
        return []
    rows = []
    for nodes in cfg.cluster.node_counts():
        world = nodes * cfg.cluster.ranks_per_node
        split = cfg.batch_split(world)
        fitted = cfg.fit_world(world) if split else None
        memory = memory_estimate(fitted, num_params, world) if fitted else None
        rows.append(NodeCountRow(nodes, world, split, memory))
    return rows


def train_flops_per_sample(cfg: TrainConfig) -> float | None:
    """Training FLOPs (forward + backward) of one sample with the run's model on the meta device, counted as the
    trainer counts them for its MFU (:func:`trainer.observability.metrics.flop_counter`); None for detection."""
    if cfg.stage == "detection":
        return None
    model = planned_model(cfg)
    size = cfg.data.image_size
    images = torch.empty(1, 3, size, size, device="meta")
    with flop_counter() as counter:
        if isinstance(model, FCMAE):
            grid = size // model.patch_size
            mask = random_mask(1, grid * grid, model.mask_ratio, torch.Generator().manual_seed(0)).to("meta")
            loss, _, _ = model(images, mask, visible=model.visible_patches(grid, grid))
        else:
            loss = model(images).sum()
        loss.backward()
    return float(counter.get_total_flops())


def measured_mfu(cfg: TrainConfig, run_dir: Path | None) -> tuple[float, str]:
    """The MFU the time estimate assumes: the median of the last segment's logged MFU in ``run_dir`` when it has
    one, else ``cluster.assumed_mfu``."""
    if run_dir is not None and RunDir(run_dir).metrics_log.exists():
        paths = RunDir(run_dir)
        starts = read_records(paths.segments) if paths.segments.exists() else []
        resumed = re.match(r"step_(\d+)", str(starts[-1].get("resumed_from") or "")) if starts else None
        after = int(resumed.group(1)) if resumed else 0
        values = [float(r["mfu_pct"]) / 100 for r in read_records(paths.metrics_log)
                  if r.get("kind") == "train" and "mfu_pct" in r and int(r["step"]) > after]  # fmt: skip
        if values:
            return statistics.median(values), f"measured: median of {len(values)} logged steps in {run_dir}"
    return cfg.cluster.assumed_mfu, "assumed: cluster.assumed_mfu"


def time_lines(cfg: TrainConfig, plan: Plan) -> list[str]:
    """Steps per hour, days and GPU-hours of the whole run on the fewest and the most nodes, from the counted
    FLOPs at the plan's MFU on ``cluster.gpu_model``."""
    c = cfg.cluster
    if not c.gpus_per_node:
        return ["  time              not estimated for CPU ranks (no peak FLOP/s; the run logs its throughput)"]
    peak = peak_flops(c.gpu_model, cfg.deepspeed.precision)
    if peak is None:
        known = ", ".join(sorted(PEAK_FLOPS))
        return [f"  time              not estimated: no peak FLOP/s known for cluster.gpu_model={c.gpu_model!r} "
                f"(known: {known})"]  # fmt: skip
    if plan.flops_per_sample is None:
        return ["  time              not estimated for detection (its FLOPs depend on the images' boxes)"]
    mfu, source = plan.mfu
    lines = [f"  time              at MFU {mfu:.0%} ({source}) of {c.gpu_model} ({peak / 1e12:.0f} TFLOP/s "
             f"{'fp32' if cfg.deepspeed.precision == 'fp32' else 'bf16'}), "
             f"{plan.flops_per_sample / 1e9:.1f} GFLOP per sample:"]  # fmt: skip
    for nodes in sorted({min(c.node_counts()), max(c.node_counts())}):
        gpus = nodes * c.gpus_per_node
        if cfg.batch_split(gpus) is None:
            lines.append(f"    {nodes:>4} nodes   refused at start (cannot make the global batch)")
            continue
        step_s = plan.global_batch * plan.flops_per_sample / (gpus * peak * mfu)
        hours = plan.total_steps * step_s / 3600
        length = f"{hours:.1f} hours" if hours < 48 else f"{hours / 24:.1f} days"
        lines.append(f"    {nodes:>4} nodes   {3600 / step_s:,.0f} steps/hour, {length} to finish, "
                     f"{hours * gpus:,.0f} GPU-hours")  # fmt: skip
    return lines


def make_plan(cfg: TrainConfig, run_dir: Path | None = None) -> Plan:
    """The plan of a launch of ``cfg`` on its cluster section (``run_dir``: where its measured MFU may be)."""
    world, configured = cfg.world_size(), cfg
    cfg = cfg.fit_world(world)  # the split on the most nodes (node_rows fits each count from the config as given)
    num_params, params_note = count_parameters(cfg)
    size, note = dataset_size(cfg)
    global_batch = cfg.global_batch(world)
    steps_per_epoch = size // global_batch
    total = cfg.total_steps(steps_per_epoch)
    return Plan(
        world_size=world,
        nodes=cfg.cluster.nodes,
        ranks_per_node=cfg.cluster.ranks_per_node,
        micro_batch=cfg.data.batch_size,
        grad_accum=cfg.deepspeed.grad_accum,
        global_batch=global_batch,
        lr=cfg.lr(world),
        dataset_size=size,
        dataset_note=note,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        num_params=num_params,
        params_note=params_note,
        memory=memory_estimate(cfg, num_params, world),
        sbatch=sbatch_options(cfg),
        node_rows=node_rows(configured, num_params),
        flops_per_sample=train_flops_per_sample(cfg),
        mfu=measured_mfu(cfg, run_dir),
    )


def format_plan(cfg: TrainConfig, plan: Plan) -> str:
    """Human-readable plan."""
    m = plan.memory
    device = "GPU" if cfg.cluster.gpus_per_node else "CPU rank"
    lines = [
        f"plan for {cfg.name} ({cfg.stage}, ConvNeXt V2 {cfg.model.size}, {cfg.deepspeed.precision}, "
        f"ZeRO-{cfg.deepspeed.zero_stage})",
        f"  world size        {plan.world_size} = {plan.nodes} nodes x {plan.ranks_per_node} {device}s",
        f"  batch             {plan.micro_batch} per device x {plan.grad_accum} accumulation x {plan.world_size} "
        f"= {plan.global_batch} global",
        f"  learning rate     {plan.lr:.4g} (base {cfg.optim.base_lr:g} x {plan.global_batch} / 256)",
        f"  data              {plan.dataset_size:,} samples ({plan.dataset_note})",
        f"  steps             {plan.steps_per_epoch:,} per epoch x {cfg.schedule.epochs:g} epochs = "
        f"{plan.total_steps:,} total ({cfg.schedule.warmup_epochs:g} warmup epochs)",
        f"  parameters        {plan.num_params / 1e6:.1f}M ({plan.params_note})",
        f"  memory/{device:<8} {m.total / GiB:.1f} GiB = weights {m.params / GiB:.2f} + grads {m.grads / GiB:.2f} "
        f"+ optimizer {m.optimizer / GiB:.2f} + activations {m.activations / GiB:.1f} (batch {plan.micro_batch})"
        if m.activations == m.activations  # not NaN
        else f"  memory/{device:<8} weights {m.params / GiB:.2f} + grads {m.grads / GiB:.2f} + optimizer "
        f"{m.optimizer / GiB:.2f} GiB (model states; detection activations are not estimated)",
        checkpoint_line(cfg, plan.num_params),
        *time_lines(cfg, plan),
        f"  sbatch            {' '.join(plan.sbatch)}",
    ]
    if plan.node_rows:
        lines.append(f"  node range        {cfg.cluster.min_nodes}-{cfg.cluster.nodes} nodes, global batch "
                     f"{plan.global_batch} on each (lr and schedule as above):")  # fmt: skip
        lines.append(f"    {'nodes':>5}  {'world':>5}  {'batch/device':>12}  {'accumulation':>12}  memory/{device}")
        for row in plan.node_rows:
            if row.split is None or row.memory is None:
                lines.append(f"    {row.nodes:>5}  {row.world_size:>5}  refused at start: cannot make the global batch")
                continue
            memory = "-" if row.memory.total != row.memory.total else f"{row.memory.total / GiB:.1f} GiB"
            micro, accum = row.split
            lines.append(f"    {row.nodes:>5}  {row.world_size:>5}  {micro:>12}  {accum:>12}  {memory}")
    return "\n".join(lines)


def checkpoint_line(cfg: TrainConfig, num_params: int) -> str:
    """The checkpoint's size and write time against the preemption warning window (``cluster.signal_delay_s``)."""
    from trainer.resilience.checkpoint import checkpoint_bytes, fits_save_window

    size = checkpoint_bytes(num_params, cfg.deepspeed.precision, cfg.deepspeed.zero_stage)
    seconds = size / (cfg.checkpoint.write_mb_per_s * 1e6)
    window = cfg.cluster.signal_delay_s
    verdict = "fits" if fits_save_window(seconds, window) else "DOES NOT FIT (raise cluster.signal_delay_s)"
    return (
        f"  checkpoint        {size / 1e9:.1f} GB, ~{seconds:.0f}s to save at {cfg.checkpoint.write_mb_per_s:g} MB/s "
        f"(checkpoint.write_mb_per_s): {verdict} in the {window}s preemption warning window"
    )
