"""One config schema for the whole system, split by component, loaded from YAML files in ``configs/``.

A config file may ``extends:`` another (or a list of them); later values win, nested sections merge. Command-line
overrides are ``dotted.key=value`` with YAML-typed values (``optim.base_lr=3e-4``, ``deepspeed.zero_stage=2``).
Unknown keys and bad values raise :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

ModelSizeName = Literal["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"]
BlockName = Literal["v2", "v1"]
"""ConvNeXt V2 blocks, or V1 blocks (LayerScale, no GRN): the paper's ablation (``models.convnextv2.BlockKind``)."""


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelConfig(_Section):
    """What network is trained: the settings every stage shares."""

    size: ModelSizeName = Field("atto", description="ConvNeXt V2 size")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth rate of the last block")
    grad_checkpointing: bool | tuple[bool, bool, bool, bool] = Field(
        False, description="activation checkpointing of the encoder: all stages, or one flag per stage"
    )


class FCMAEModelConfig(ModelConfig):
    """The FCMAE (pretraining): ConvNeXt V2 encoder, sparse backend, one-block decoder."""

    mask_ratio: float = Field(0.6, ge=0.0, lt=1.0, description="fraction of 32-px patches masked (FCMAE)")
    decoder_dim: int = Field(512, ge=1, description="FCMAE decoder width")
    decoder_depth: int = Field(1, ge=1, description="FCMAE decoder blocks")
    norm_pix_loss: bool = Field(True, description="regress per-patch normalized pixels")
    backend: Literal["gather", "dense_masked", "minkowski"] = Field("gather", description="sparse encoder backend")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    compile: bool = Field(False, description="torch.compile the model (gather and dense_masked backends)")
    block: BlockName = Field("v2", description="v1: ConvNeXt V1 blocks (LayerScale, no GRN), an ablation")
    sparse: bool = Field(True, description="false: dense convs on the masked image, the paper's ablation")
    init_from: str | None = Field(
        None,
        description="continue pretraining from these weights (path or URL): the official FCMAE or dense ConvNeXt V2 "
        "checkpoints, timm convnextv2 weights, this project's export or a run directory / checkpoint; None: random",
    )

    @model_validator(mode="after")
    def _backend_rules(self) -> FCMAEModelConfig:
        if self.backend == "minkowski" and (self.grad_checkpointing is not False or self.compile):
            raise ValueError(
                "model.grad_checkpointing and model.compile work with the gather and dense_masked backends, not "
                "minkowski (MinkowskiEngine's sparse tensors): use model.backend=gather"
            )
        return self


class TransferModelConfig(ModelConfig):
    """A network that starts from pretrained weights and predicts ``num_classes`` classes (detection)."""

    num_classes: int = Field(1000, ge=1, description="classes of the classifier / detector (without background)")
    pretrained: str | None = Field(
        None,
        description="weights to start from: the previous stage's export/model.safetensors by path or URL, or an "
        "official / timm ConvNeXt V2 checkpoint",
    )


class ClassifierModelConfig(TransferModelConfig):
    """The classifier (fine-tuning)."""

    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    compile: bool = Field(False, description="torch.compile the model")
    block: BlockName = Field(
        "v2", description="v1: ConvNeXt V1 blocks (LayerScale, no GRN), to fine-tune the V1 ablation's encoder"
    )


class DataConfig(_Section):
    """Where samples come from and how they are batched."""

    train_url: str | list[str] | dict[str, float] = Field(
        "",
        description="training shards: a shard set with manifest.json, a directory of .tar shards, a brace pattern "
        "(s3://bucket/in1k/train-{0000..1023}.tar) or synthetic://N (path, file://, s3://); a list of those (one "
        "set, their union); or a weighted mixture {url: weight, ...} whose sources keep their shares in every epoch",
    )
    val_url: str | list[str] | None = Field(
        None, description="validation shards, in the forms of train_url (no mixture)"
    )
    label_field: str | None = Field(
        None, description="for shards without .cls labels: the .json field holding the integer class (e.g. 'label')"
    )
    image_size: int = Field(224, ge=32, description="training crop size; a multiple of 32 for FCMAE")
    batch_size: int = Field(64, ge=1, description="micro-batch per device")
    batch_size_choices: list[int] = Field(
        default_factory=list,
        description="smaller micro-batches per device a run on a node range may switch to when data.batch_size "
        "cannot make the global batch with a whole accumulation on the nodes it got",
    )
    canonical_ranks: int | None = Field(
        None,
        ge=1,
        description="the data-parallel ranks the sample order is planned for: a world size that divides it (with "
        "the same global batch) trains every step on the samples the canonical run would, so a run that loses or "
        "regains nodes keeps its sample sequence; other world sizes re-plan the rest of the epoch (no sample "
        "repeated). null: the configured world size (cluster.nodes x ranks per node)",
    )
    canonical_batch_size: int | None = Field(
        None,
        ge=1,
        description="the micro-batch of the canonical layout (the sample order depends on it); null: what the "
        "config makes on data.canonical_ranks (data.batch_size, or the largest of data.batch_size_choices that fits)",
    )
    num_workers: int = Field(4, ge=0, description="dataloader worker processes per rank")
    shuffle_window: int = Field(
        1024, ge=0, description="samples shuffled together within each worker's contiguous share (0: shard order)"
    )

    @model_validator(mode="after")
    def _check_batch_choices(self) -> DataConfig:
        bad = [b for b in self.batch_size_choices if not 1 <= b < self.batch_size]
        if bad:
            raise ValueError(
                f"data.batch_size_choices {bad}: each a micro-batch from 1 to below data.batch_size={self.batch_size} "
                "(the largest that fits is data.batch_size itself)"
            )
        return self

    @model_validator(mode="after")
    def _check_sources(self) -> DataConfig:
        if not self.train_url and isinstance(self.train_url, str):
            raise ValueError("data.train_url is empty: set it to a shard set (path or s3:// URL) or synthetic://N")
        for key, spec in (("train_url", self.train_url), ("val_url", self.val_url)):
            if isinstance(spec, list | dict):
                if not spec:
                    raise ValueError(f"data.{key} is an empty {type(spec).__name__}: name at least one shard set")
                synthetic = [url for url in spec if url.startswith("synthetic://")]
                if synthetic:
                    raise ValueError(f"data.{key}: {synthetic[0]} cannot be part of a list or mixture; use it alone")
            if isinstance(spec, dict):
                bad = {url: w for url, w in spec.items() if not w > 0}
                if bad:
                    raise ValueError(f"data.{key}: mixture weights must be positive, got {bad}")
        return self


class PretrainDataConfig(DataConfig):
    """Pretraining data: the shards and the RandomResizedCrop of the FCMAE recipe."""

    min_scale: float = Field(0.2, gt=0.0, le=1.0, description="RandomResizedCrop lower scale bound")


class FinetuneSection(_Section):
    """Classification fine-tuning recipe (paper, appendix): layer decay, EMA, Mixup/CutMix, RandAugment."""

    layer_decay: float = Field(0.8, gt=0.0, le=1.0, description="layer-wise lr decay factor")
    layer_decay_grouping: Literal["block", "stage"] = Field(
        "block", description="decay per block (small sizes) or per group of blocks (base and up, as the paper)"
    )
    ema_decay: float | None = Field(0.9999, gt=0.0, lt=1.0, description="EMA of weights (None: off)")
    mixup: float = Field(0.8, ge=0.0, description="Mixup alpha (0: off)")
    cutmix: float = Field(1.0, ge=0.0, description="CutMix alpha (0: off)")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="label smoothing")
    auto_augment: str = Field("rand-m9-mstd0.5-inc1", description="timm RandAugment spec ('' to disable)")
    re_prob: float = Field(0.25, ge=0.0, le=1.0, description="RandomErasing probability")
    crop_pct: float = Field(0.875, gt=0.0, le=1.0, description="eval center-crop fraction")
    head_init_scale: float = Field(0.001, gt=0.0, description="scale of the new classifier's initial weights")
    linear_probe: bool = Field(
        False,
        description="linear probing: only a new head trains, on the frozen trunk's pooled features normalized by a "
        "BatchNorm without affine (MAE's protocol), with LARS; no mixup, RandAugment, erasing or drop path",
    )


class DetectionSection(_Section):
    """Mask R-CNN transfer (torchvision) on the ConvNeXt V2 backbone."""

    layer_decay: float = Field(0.9, gt=0.0, le=1.0, description="layer-wise lr decay over the backbone")
    min_scale: float = Field(0.1, gt=0.0, description="large-scale jitter: smallest resize factor")
    max_scale: float = Field(2.0, gt=0.0, description="large-scale jitter: largest resize factor")
    fpn_channels: int = Field(256, ge=1, description="FPN width")
    anchor_sizes: tuple[int, ...] = Field(
        (32, 64, 128, 256, 512), description="anchor size per FPN level (P2..P6), matched to the level's stride"
    )
    detections_per_image: int = Field(100, ge=1, description="boxes kept per image at evaluation")


class OptimConfig(_Section):
    """AdamW and its learning rate."""

    base_lr: float = Field(1.5e-4, gt=0, description="lr for a global batch of 256; lr = base_lr * global_batch / 256")
    min_lr: float = Field(0.0, ge=0, description="floor of the cosine schedule")
    weight_decay: float = Field(0.05, ge=0, description="decoupled weight decay (not on biases, norms, GRN)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    grad_clip: float | None = Field(None, gt=0, description="clip the global grad norm to this value")


class ScheduleConfig(_Section):
    """How long to train: epochs, warmup, and an optional step cap."""

    epochs: float = Field(800, gt=0, description="training epochs")
    warmup_epochs: float = Field(40, ge=0, description="linear warmup epochs")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (demos, tests)")
    max_skipped_steps: int = Field(
        10, ge=1, description="after this many non-finite steps in a row, roll back (or stop when none are left)"
    )
    spike_factor: float | None = Field(
        3.0,
        gt=1.0,
        description="a log interval whose loss exceeds this multiple of the recent median is a spike: "
        "roll back to the last checkpoint before it and skip its samples (None: off)",
    )
    spike_window: int = Field(20, ge=2, description="log intervals the spike median is taken over")
    max_rollbacks: int = Field(3, ge=0, description="rollbacks a run may make before it fails")


class PretrainScheduleConfig(ScheduleConfig):
    """Pretraining's schedule, plus the decoder warm-up of a continuation."""

    decoder_warmup_steps: int = Field(
        0,
        ge=0,
        description="train only the decoder and mask token for the first N steps of a run that starts from "
        "model.init_from (the encoder frozen; its optimizer state starts at the switch)",
    )


class DeepSpeedConfig(_Section):
    """Sharding, precision and accumulation."""

    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="ZeRO stage")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "bf16", description="training precision (fp16 uses loss scaling)"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    global_batch: int | None = Field(
        None, ge=1, description="expected global batch; checked against batch_size x grad_accum x world size"
    )
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state offload to CPU")
    overrides: dict[str, Any] = Field(default_factory=dict, description="raw DeepSpeed config keys merged last")


class CheckpointConfig(_Section):
    """When checkpoints are written, how many are kept, and where they are mirrored."""

    every_steps: int = Field(1000, ge=1, description="save a checkpoint every N optimizer steps")
    every_minutes: float | None = Field(
        None, gt=0, description="also save when this many minutes passed since the last save (rank 0's clock)"
    )
    keep: int = Field(3, ge=1, description="complete checkpoints kept locally")
    mirror_url: str | None = Field(
        None, description="fsspec URL each complete checkpoint is copied to, in the background"
    )
    mirror_queue: int = Field(
        2, ge=1, description="checkpoints waiting for upload; a newer one drops the oldest waiting (never the step)"
    )
    write_mb_per_s: float = Field(
        1000.0,
        gt=0,
        description="expected checkpoint write bandwidth (MB/s), to check a save fits in the "
        "preemption warning window (cluster.signal_delay_s) before the first measured save",
    )


class TrackingConfig(_Section):
    """Console and MLflow logging."""

    experiment: str = Field("fcmae", description="MLflow experiment name")
    tracking_uri: str | None = Field(None, description="MLflow URI; default: env MLFLOW_TRACKING_URI or run dir sqlite")
    register_as: str | None = Field(
        None, description="register the export (an MLflow logged model) as a new version of this registered model"
    )
    log_every: int = Field(20, ge=1, description="console + metric logging interval (steps)")
    baseline_of: str | None = Field(
        None,
        description="the run directory of the run this one is the random-weights baseline of: MLflow tags and "
        "nests the pair together (set by cluster/launch.py --payoff)",
    )
    sample_ledger: bool = Field(
        False, description="write the sample keys of every step to ledger/rank_N.jsonl in the run directory"
    )
    profile_steps: tuple[int, int] | None = Field(
        None,
        description="[first, last] optimizer steps to profile on every rank: a PyTorch profiler trace, the ops' "
        "table and on CUDA a memory snapshot in profile/ of the run directory, logged as MLflow artifacts",
    )
    system_metrics: bool = Field(False, description="log CPU, memory, disk, network and GPU metrics to MLflow")
    system_metrics_interval_s: float = Field(10, gt=0, description="seconds between two system metrics samples")

    @model_validator(mode="after")
    def _check_profile_steps(self) -> TrackingConfig:
        if self.profile_steps is not None and not 1 <= self.profile_steps[0] <= self.profile_steps[1]:
            raise ValueError(
                f"tracking.profile_steps {list(self.profile_steps)}: [first, last] with 1 <= first <= last"
            )
        return self


class EvalConfig(_Section):
    """When the stage's evaluation runs (reconstructions and feature statistics, top-1, COCO AP); always at the end."""

    every_steps: int = Field(1000, ge=1, description="evaluate every N optimizer steps")
    each_epoch: bool = Field(False, description="also evaluate at the end of every epoch")


class PretrainEvalConfig(EvalConfig):
    """Pretraining's evaluation, plus the representation probes: online kNN on a labeled bank, effective rank."""

    knn_bank_url: str | list[str] | None = Field(
        None,
        description="labeled shards whose pooled encoder features are the kNN bank (a subset of the training "
        "set, e.g. a brace pattern over a few shards); the queries are data.val_url. None: no kNN",
    )
    knn_k: int = Field(20, ge=1, description="neighbours that vote")
    knn_temperature: float = Field(0.07, gt=0, description="vote weight exp(similarity / T)")
    collapse_fraction: float = Field(
        0.5, gt=0, lt=1, description="warn when the effective rank falls below this fraction of its first value"
    )


class WatchdogConfig(_Section):
    """The step watchdog: a rank silent for longer than its timeout dumps its stacks and exits non-zero."""

    enabled: bool = Field(True, description="watch every rank for steps that stop")
    min_timeout_s: float = Field(600, ge=1, description="the least silence allowed between two steps (seconds)")
    step_factor: float = Field(20, ge=1, description="allowed silence = this x the median recent step time (if more)")
    phase_timeout_s: float = Field(3600, ge=1, description="allowed time of one evaluation, checkpoint save or export")


class ClusterConfig(_Section):
    """SLURM resources (used by cluster/launch.py)."""

    nodes: int = Field(1, ge=1, description="nodes (the most, with min_nodes)")
    min_nodes: int | None = Field(
        None,
        ge=1,
        description="the fewest nodes the job may run on (SLURM --nodes=min_nodes-nodes; --nodes 12-16): on fewer "
        "than `nodes` a run keeps the global batch, lr and schedule by accumulating more; null: exactly `nodes`",
    )
    gpus_per_node: int = Field(8, ge=0, description="GPUs (tasks) per node; 0 = CPU ranks")
    cpu_ranks_per_node: int = Field(1, ge=1, description="ranks per node when gpus_per_node is 0")
    partition: str | None = Field(None, description="SLURM partition")
    account: str | None = Field(None, description="SLURM account")
    time_min: int = Field(24 * 60, ge=1, description="job time limit in minutes")
    gpu_model: str = Field(
        "NVIDIA H100 80GB HBM3",
        description="the GPU the dry run's time and cost estimate assumes (its dense peak FLOP/s; a name of "
        "trainer.observability.metrics.PEAK_FLOPS, as torch.cuda.get_device_name says it)",
    )
    assumed_mfu: float = Field(
        0.35,
        gt=0,
        le=1,
        description="model FLOPs utilization the dry run's time estimate assumes; a run directory with a measured "
        "MFU (its last segment's) replaces it",
    )
    cpus_per_task: int = Field(10, ge=1, description="CPU cores per task (dataloader workers + 2)")
    mem_gb: int | None = Field(None, ge=1, description="memory per node in GiB")
    signal_delay_s: int = Field(120, ge=10, description="seconds before the time limit that SLURM sends USR2")
    max_requeues: int = Field(20, ge=0, description="requeues after preemption / time limit")
    max_failure_retries: int = Field(2, ge=0, description="requeues after a real error (then the failure stands)")

    @model_validator(mode="after")
    def _check_node_range(self) -> ClusterConfig:
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            raise ValueError(f"cluster.min_nodes={self.min_nodes} exceeds cluster.nodes={self.nodes} (the most nodes)")
        return self

    @property
    def ranks_per_node(self) -> int:
        """Tasks per node: one per GPU, or ``cpu_ranks_per_node`` CPU ranks when ``gpus_per_node`` is 0."""
        return self.gpus_per_node or self.cpu_ranks_per_node

    def node_counts(self) -> range:
        """The node counts the job may run on: ``min_nodes`` to ``nodes``, or exactly ``nodes``."""
        return range(self.min_nodes or self.nodes, self.nodes + 1)


def _counts(counts: list[int]) -> str:
    """``[12, 13, 14, 16]`` as ``12-14, 16``."""
    runs: list[list[int]] = []
    for n in counts:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


class RunConfig(_Section):
    """What every stage's run has: the sections all stages read. A run's config is one of :data:`TrainConfig`."""

    name: str = Field("run", description="config name (set from the file name)")
    seed: int = Field(0, description="run seed: shard order, crops, masks and drop path derive from it")
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _schedule_rules(self) -> RunConfig:
        if self.schedule.warmup_epochs > self.schedule.epochs:
            raise ValueError(
                f"schedule.warmup_epochs={self.schedule.warmup_epochs} exceeds schedule.epochs={self.schedule.epochs}"
            )
        return self

    def world_size(self) -> int:
        """Ranks the cluster section asks for."""
        return self.cluster.nodes * self.cluster.ranks_per_node

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run: the epochs, capped by ``schedule.max_steps``."""
        steps = math.ceil(self.schedule.epochs * steps_per_epoch)
        return min(steps, self.schedule.max_steps) if self.schedule.max_steps else steps

    def fit_world(self, world_size: int) -> Self:
        """The config as it runs on ``world_size`` ranks. On a node range (``cluster.min_nodes``) the global batch,
        and with it the lr and the schedule, stays the configured one (:meth:`configured_global_batch`): the
        accumulation, and when needed the micro-batch (``data.batch_size`` or one of ``data.batch_size_choices``),
        are chosen to make it exactly; a world size that cannot is refused, naming the node counts that can.
        Without a range the config is returned as it is (:meth:`global_batch` checks it)."""
        c = self.cluster
        if c.min_nodes is None:
            return self
        target = self.configured_global_batch()
        canonical = self.canonical_layout()
        nodes, rest = divmod(world_size, c.ranks_per_node)
        if rest or nodes not in c.node_counts():
            raise ConfigError(
                f"world size {world_size} is not {c.min_nodes}-{c.nodes} nodes x {c.ranks_per_node} ranks "
                "(cluster.min_nodes, cluster.nodes)"
            )
        fit = self.batch_split(world_size)
        if fit is None:
            raise ConfigError(self._no_fit(nodes, target))
        micro, accum = fit
        return self.model_copy(
            update={
                "data": self.data.model_copy(
                    update={"batch_size": micro, "canonical_ranks": canonical[0], "canonical_batch_size": canonical[1]}
                ),
                "deepspeed": self.deepspeed.model_copy(update={"grad_accum": accum, "global_batch": target}),
            }
        )

    def canonical_layout(self) -> tuple[int, int]:
        """(ranks, micro-batch) the sample order is planned for: ``data.canonical_ranks`` (default the configured
        world size) and ``data.canonical_batch_size`` (default the micro-batch :meth:`batch_split` picks there, else
        ``data.batch_size``)."""
        ranks = self.data.canonical_ranks or self.world_size()
        if self.data.canonical_batch_size:
            return ranks, self.data.canonical_batch_size
        split = self.batch_split(ranks)
        return ranks, split[0] if split else self.data.batch_size

    def configured_global_batch(self) -> int:
        """The global batch a run on a node range keeps: ``deepspeed.global_batch``, else what the config makes
        on its most nodes (``data.batch_size`` x ``deepspeed.grad_accum`` x ``nodes`` x ranks per node)."""
        return self.deepspeed.global_batch or self.data.batch_size * self.deepspeed.grad_accum * self.world_size()

    def micro_batches(self) -> list[int]:
        """The micro-batches a run may use, largest first: ``data.batch_size`` and ``data.batch_size_choices``."""
        return sorted({self.data.batch_size, *self.data.batch_size_choices}, reverse=True)

    def batch_split(self, world_size: int) -> tuple[int, int] | None:
        """(micro-batch, accumulation) that make :meth:`configured_global_batch` on ``world_size`` ranks: the
        largest allowed micro-batch that divides it with a whole accumulation, or None."""
        target = self.configured_global_batch()
        for micro in self.micro_batches():
            if target % (micro * world_size) == 0:
                return micro, target // (micro * world_size)
        return None

    def check_node_range(self) -> str | None:
        """Before the job queues for a node range: refuse one where no count can make the configured global batch;
        where only some can, the warning to print (a job that starts on another count is refused at start)."""
        c = self.cluster
        if c.min_nodes is None:
            return None
        bad = [n for n in c.node_counts() if self.batch_split(n * c.ranks_per_node) is None]
        if not bad:
            return None
        good = [n for n in c.node_counts() if n not in bad]
        micro = self.micro_batches()
        why = (
            f"on {_counts(bad)} node(s) x {c.ranks_per_node} ranks no micro-batch of {micro} with a whole "
            f"accumulation makes the global batch {self.configured_global_batch()}"
        )
        fix = (
            "add a micro-batch to data.batch_size_choices, or set deepspeed.global_batch to a multiple of the ranks "
            "of the counts you want"
        )
        if not good:
            raise ConfigError(f"--nodes {c.min_nodes}-{c.nodes}: {why}; no count of the range can ({fix})")
        return (
            f"--nodes {c.min_nodes}-{c.nodes}: {why}: a job SLURM starts on one of those is refused at start (and "
            f"requeued as a failure); counts of the range that can: {_counts(good)} (narrow the range, or {fix})"
        )

    def _no_fit(self, nodes: int, target: int) -> str:
        rpn = self.cluster.ranks_per_node
        micro = self.micro_batches()
        can = [n for n in range(1, 2 * self.cluster.nodes + 1) if self.batch_split(n * rpn) is not None]
        nearest = sorted(can, key=lambda n: (abs(n - nodes), n))[:2]
        return (
            f"{nodes} node(s) x {rpn} ranks cannot make the global batch {target} with a micro-batch of {micro} and "
            f"a whole accumulation; node counts that can, nearest first: {', '.join(map(str, sorted(nearest)))} "
            "(narrow --nodes to counts that can, or add a micro-batch to data.batch_size_choices)"
        )

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step for a world size; checked against ``deepspeed.global_batch`` if set."""
        actual = self.data.batch_size * self.deepspeed.grad_accum * world_size
        expected = self.deepspeed.global_batch
        if expected is not None and expected != actual:
            raise ConfigError(
                f"deepspeed.global_batch={expected} but data.batch_size={self.data.batch_size} x "
                f"deepspeed.grad_accum={self.deepspeed.grad_accum} x world size {world_size} = {actual}; "
                "change one of them (or unset deepspeed.global_batch)"
            )
        return actual

    def lr(self, world_size: int) -> float:
        """Peak learning rate: base_lr scaled linearly with the global batch (per 256)."""
        return self.optim.base_lr * self.global_batch(world_size) / 256

    def to_yaml(self) -> str:
        """The resolved config as YAML (what is stored with the run)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class PretrainConfig(RunConfig):
    """FCMAE pretraining (``stage: pretrain``)."""

    stage: Literal["pretrain"] = Field("pretrain", description="what this run trains")
    model: FCMAEModelConfig = Field(default_factory=FCMAEModelConfig)
    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig)
    eval: PretrainEvalConfig = Field(default_factory=PretrainEvalConfig)
    schedule: PretrainScheduleConfig = Field(default_factory=PretrainScheduleConfig)

    @model_validator(mode="after")
    def _patch_rules(self) -> PretrainConfig:
        if self.data.image_size % 32:
            raise ValueError(
                f"data.image_size={self.data.image_size} must be a multiple of 32 for FCMAE (32-px patches)"
            )
        patches = (self.data.image_size // 32) ** 2
        if int(patches * (1 - self.model.mask_ratio)) < 1:  # the official int(L * (1 - ratio)), models.masking
            raise ValueError(
                f"model.mask_ratio={self.model.mask_ratio} leaves no visible patch of the {patches} at "
                f"data.image_size={self.data.image_size}: lower model.mask_ratio below {1 - 1 / patches:.3g} or "
                "raise data.image_size"
            )
        if bool(self.eval.knn_bank_url) != bool(self.data.val_url):
            raise ValueError(
                "pretraining's kNN probe needs both eval.knn_bank_url (the labeled bank) and data.val_url (the "
                "queries); set both, or neither"
            )
        if self.schedule.decoder_warmup_steps and not self.model.init_from:
            raise ValueError(
                f"schedule.decoder_warmup_steps={self.schedule.decoder_warmup_steps} freezes the encoder, which only "
                "makes sense for pretrained weights: set model.init_from, or schedule.decoder_warmup_steps=0"
            )
        return self


class _ValidatedRunConfig(RunConfig):
    """A stage that evaluates on ``data.val_url`` (fine-tuning, detection): the URL must be set."""

    stage: str

    @model_validator(mode="after")
    def _val_rules(self) -> _ValidatedRunConfig:
        if not self.data.val_url:
            raise ValueError(f"stage {self.stage} evaluates on data.val_url: set it to the validation shard set")
        return self


class FinetuneConfig(_ValidatedRunConfig):
    """Classification fine-tuning (``stage: finetune``)."""

    stage: Literal["finetune"] = Field("finetune", description="what this run trains")
    model: ClassifierModelConfig = Field(default_factory=ClassifierModelConfig)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)

    @model_validator(mode="after")
    def _probe_rules(self) -> FinetuneConfig:
        ft = self.finetune
        if not ft.linear_probe:
            return self
        changes = {"finetune.mixup": ft.mixup, "finetune.cutmix": ft.cutmix, "finetune.re_prob": ft.re_prob,
                   "finetune.auto_augment": ft.auto_augment, "model.drop_path": self.model.drop_path}  # fmt: skip
        active = [f"{key}={value!r}" for key, value in changes.items() if value]
        if active:
            raise ValueError(
                f"finetune.linear_probe trains a linear head on the frozen trunk's features, which {', '.join(active)} "
                "would change (or whose labels they would mix): set them to 0 or '' (the *_linprobe recipes do)"
            )
        return self


class DetectionConfig(_ValidatedRunConfig):
    """Mask R-CNN transfer (``stage: detection``)."""

    stage: Literal["detection"] = Field("detection", description="what this run trains")
    model: TransferModelConfig = Field(default_factory=TransferModelConfig)
    detection: DetectionSection = Field(default_factory=DetectionSection)


TrainConfig = PretrainConfig | FinetuneConfig | DetectionConfig
"""A run's config: one class per stage, chosen by its ``stage`` key (default ``pretrain``)."""

STAGE_CONFIGS: dict[str, type[RunConfig]] = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "detection": DetectionConfig,
}


def available_configs() -> list[str]:
    """Names of the configs in ``configs/`` (files starting with ``_`` are bases, not listed)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"no config named {name!r}; available: {', '.join(available_configs())}")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_raw(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = _config_path(name)
    if str(path) in seen:
        raise ConfigError(f"config {name!r} extends itself: {' -> '.join([*seen, str(path)])}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    parents = raw.pop("extends", [])
    merged: dict[str, Any] = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = _deep_merge(merged, _load_raw(parent, (*seen, str(path))))
    return _deep_merge(merged, raw)


def _check_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str = "", stage: str = "") -> None:
    """Unknown keys anywhere in the tree, named with their dotted path and the allowed keys; a key that another
    stage reads is named as such."""
    stage = stage or str(raw.get("stage", "pretrain"))
    for key, value in raw.items():
        field = model.model_fields.get(key)
        where = f"{prefix}{key}"
        if field is None:
            others = [name for name, cls in STAGE_CONFIGS.items() if _has_key(cls, where)]
            if others:
                keys = ", ".join(f"{where}.{k}" for k in value) if isinstance(value, dict) and value else where
                raise ConfigError(
                    f"{keys}: only stage {' and '.join(others)} reads it; this config's stage is {stage}: remove it "
                    "or move it to that stage's config"
                )
            allowed = ", ".join(model.model_fields)
            raise ConfigError(
                f"unknown config key {where!r}; allowed keys{' in ' + prefix[:-1] if prefix else ''}: {allowed}"
            )
        sub = field.annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            _check_keys(value, sub, f"{where}.", stage)


def _has_key(model: type[BaseModel], dotted: str) -> bool:
    """Whether ``dotted`` (``section.key`` or ``section``) is a field path of ``model``."""
    for part in dotted.split("."):
        field = model.model_fields.get(part)
        if field is None:
            return False
        sub = field.annotation
        model = sub if isinstance(sub, type) and issubclass(sub, BaseModel) else BaseModel
    return True


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> nested dict with YAML-typed values."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. optim.base_lr=3e-4)")
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    return tree


def load_config(name: str, overrides: list[str] | None = None) -> TrainConfig:
    """Resolve a named config (or a YAML path) with ``extends`` and ``key=value`` overrides."""
    raw = _load_raw(name)
    raw = _deep_merge(raw, parse_overrides(overrides or []))
    raw.setdefault("name", Path(name).stem)
    return config_from_dict(raw)


def check_runnable(cfg: TrainConfig, world_size: int, device_type: str) -> None:
    """The rules that depend on where the run goes (ranks, CPU or GPU); raises :class:`ConfigError` before
    anything is built or written."""
    cfg.fit_world(world_size).global_batch(world_size)
    if device_type == "cpu" and cfg.deepspeed.precision == "fp16":
        raise ConfigError(
            "deepspeed.precision=fp16 needs a GPU (DeepSpeed has no fp16 on CPU): use bf16 or fp32 on this machine"
        )
    if isinstance(cfg, PretrainConfig) and cfg.model.backend == "minkowski" and device_type == "cpu":
        from models.masked_encoder import minkowski_available

        if not minkowski_available():
            raise ConfigError(
                "model.backend=minkowski needs MinkowskiEngine, which does not import here (`make minkowski` builds "
                "it CPU-only); use model.backend=gather"
            )


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Validate a raw config tree as its stage's config, turning pydantic's errors into messages that name the key."""
    stage = raw.get("stage", "pretrain")
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"stage: unknown stage {stage!r}; choose one of {', '.join(STAGE_CONFIGS)}")
    cls = STAGE_CONFIGS[stage]
    _check_keys(raw, cls)
    try:
        return cls.model_validate(raw)  # type: ignore[return-value]
    except ValidationError as err:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            if not where:  # a cross-field rule: its message names the keys
                problems.append(str(e["msg"]).removeprefix("Value error, "))
                continue
            problems.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None


# Keys of configs stored by earlier versions (one flat schema for all stages): where they live now.
_MOVED_KEYS = {
    ("tracking", "eval_every"): ("eval", "every_steps"),
    ("tracking", "eval_each_epoch"): ("eval", "each_epoch"),
}


def upgrade_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A run directory's ``config.yaml`` written by an earlier version, in today's schema: moved keys moved, and
    the sections and keys of other stages (which that version stored with every run, at their defaults) dropped.
    A config that already fits is returned unchanged."""
    out = copy.deepcopy(raw)
    for (section, key), (new_section, new_key) in _MOVED_KEYS.items():
        if key in out.get(section, {}):
            out.setdefault(new_section, {})[new_key] = out[section].pop(key)
    cls = STAGE_CONFIGS.get(out.get("stage", "pretrain"))
    if cls is not None:
        _drop_foreign(out, cls)
    return out


def _drop_foreign(tree: dict[str, Any], model: type[BaseModel]) -> None:
    for key in list(tree):
        field = model.model_fields.get(key)
        if field is None:
            del tree[key]
        elif isinstance(tree[key], dict) and isinstance(sub := field.annotation, type) and issubclass(sub, BaseModel):
            _drop_foreign(tree[key], sub)


def read_stored_config(path: str | Path) -> dict[str, Any]:
    """The raw tree of a run directory's ``config.yaml``, upgraded to today's schema (:func:`upgrade_stored`)."""
    return upgrade_stored(yaml.safe_load(Path(path).read_text()) or {})


def load_run_config(path: str | Path) -> TrainConfig:
    """Load a resolved ``config.yaml`` stored in a run directory."""
    return config_from_dict(read_stored_config(path))
