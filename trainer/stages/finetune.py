"""Fine-tuning stage: a pretrained ConvNeXt V2 with a new head, trained as the paper's ImageNet-1K recipe.

Pretrained weights (our FCMAE export, a timm or an official checkpoint, by path or fsspec URL) must fit the
configured size exactly, except the classifier head, which is always re-initialized (truncated normal, std
``0.02 * head_init_scale``: 2e-5 at the default 0.001, the official value). Layer-wise lr decay scales each
parameter group (:func:`trainer.optim.lr_scales`); Mixup/CutMix draws come from (run seed, micro-step, rank).

EMA: every rank keeps an fp32 copy of the weights (timm's ``ModelEmaV2``), updated after every step that was not
skipped. ZeRO stages 0-2 hold full parameters on every rank, so the copies stay identical without communication;
checkpoints store it once (rank 0) and a resume broadcasts it. With ZeRO-3 the EMA is refused: updating it would
gather every parameter every step. Evaluation reports top-1/top-5 (percent) of the model and of its EMA; the best
of the two is kept in ``export/best.safetensors``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV2
from torch import nn

from data.batch import Batch
from data.loader import IGNORE_LABEL, ShardLoader
from data.manifest import manifest_url, read_manifest, shard_url
from data.reader import RawSample, ShardReader
from data.storage import url_to_fs
from data.transforms import SeededMixup, eval_transform, finetune_transform, mixup_fn
from models.convnextv2 import ConvNeXtV2, build
from trainer.config import FinetuneConfig
from trainer.distributed import DistEnv
from trainer.evaluation import EvalPasses, Evaluation
from trainer.export import atomic_write_text, write_metrics, write_weights
from trainer.loaders import build_eval_loader, build_train_loader
from trainer.observability.metrics import FlopCount, flop_counter
from trainer.optim import build_optimizer, build_sgd, lr_scales
from trainer.run_dir import RunDir
from trainer.stages.pretrained import load_pretrained

log = logging.getLogger(__name__)

HEAD_STD = 0.02  # the trunk's init std; the head starts at HEAD_STD * head_init_scale
PROBE_BN_EPS = 1e-6  # MAE's linear probe: BatchNorm1d(affine=False, eps=1e-6) before the head


class ProbeHead(nn.Sequential):
    """The linear probe's head: a BatchNorm without affine on the pooled, normalized features, then the linear
    classifier (MAE's protocol). Exported folded into one Linear (:func:`classifier_state`)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(nn.BatchNorm1d(linear.in_features, affine=False, eps=PROBE_BN_EPS), linear)

    @property
    def linear(self) -> nn.Linear:
        return cast(nn.Linear, self[1])

    @property
    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The BatchNorm's running mean and variance (buffers, updated in place)."""
        bn = cast(nn.BatchNorm1d, self[0])
        assert bn.running_mean is not None and bn.running_var is not None
        return bn.running_mean, bn.running_var


def attach_probe(model: ConvNeXtV2) -> ProbeHead:
    """Freeze every parameter but the head's and put the probe's BatchNorm in front of the head."""
    if not isinstance(model.head, nn.Linear):
        raise ValueError("model.num_classes must be >= 1 for a linear probe (it trains the classifier's head)")
    model.head = head = ProbeHead(model.head)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")
    return head


def classifier_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights in the layout ``build(size, num_classes)`` loads: a probe's BatchNorm folded into its Linear
    (``W' = W / sqrt(var + eps)``, ``b' = b - W' mean``), so a probed classifier is an ordinary one."""
    head = getattr(model, "head", None)
    state = model.state_dict()
    if not isinstance(head, ProbeHead):
        return state
    mean, var = head.stats
    with torch.no_grad():
        weight = head.linear.weight * (var + PROBE_BN_EPS).rsqrt()
        bias = head.linear.bias - weight @ mean
    out = {k: v for k, v in state.items() if not k.startswith("head.")}
    return {**out, "head.weight": weight.clone(), "head.bias": bias.clone()}


def init_head(model: ConvNeXtV2, head_init_scale: float) -> None:
    """Fresh classifier: truncated normal weights (std ``0.02 * head_init_scale``), zero bias."""
    head = model.head
    if not isinstance(head, nn.Linear):
        raise ValueError("model.num_classes must be >= 1 for fine-tuning (the classifier needs a head)")
    with torch.no_grad():
        trunc_normal_(head.weight, std=HEAD_STD * head_init_scale)
        nn.init.zeros_(head.bias)


def eval_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[top-1 hits, top-5 hits, real samples]`` of a batch (float64). A padded slot (label
    :data:`IGNORE_LABEL`) matches no class and is not a real sample, so it changes no count."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return torch.stack([hits[:, :1].any(dim=1).sum(), hits.any(dim=1).sum(), (labels != IGNORE_LABEL).sum()]).to(
        torch.float64
    )


LABELED_FILE = "labeled_samples.jsonl"
"""In a fine-tuning run's directory: every sample of a few-label training set (key, label, shard)."""


def list_labeled_subset(url: str, out: Path) -> int | None:
    """List every sample of a few-label training set (one written with ``data.write_shards --per-class N``: its
    manifest says so) with its label, in ``out``; returns the count, or None for any other set (not listed: a
    full training set's labels are its shards')."""
    fs, path = url_to_fs(manifest_url(url))
    if not fs.exists(path):  # a brace pattern or foreign shards (indexed elsewhere): not a carved subset
        return None
    manifest = read_manifest(url)
    if "per_class" not in manifest.source:
        return None
    reader = ShardReader([shard_url(url, shard.name) for shard in manifest.shards])
    lines = []
    try:
        for index, shard in enumerate(manifest.shards):
            samples = reader.read(index, range(shard.num_samples))
            for member in sorted(samples):
                sample = samples[member]
                if isinstance(sample, RawSample):
                    record = {"key": sample.key, "label": int(sample.files["cls"]), "shard": shard.name}
                    lines.append(json.dumps(record))
    finally:
        reader.close()
    atomic_write_text(out, "".join(f"{line}\n" for line in lines))
    return len(lines)


def count_classifier_flops(model: nn.Module, image_size: int, device: torch.device) -> FlopCount:
    """Training FLOPs (forward + backward) per image; a dense model does what it counts (masked == dense)."""
    training = model.training
    model.eval()  # one image: a linear probe's BatchNorm has no batch statistics of it (the count is the same)
    with flop_counter() as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=device)).sum().backward()
    model.zero_grad(set_to_none=True)
    flops = float(counter.get_total_flops())
    model.train(training)
    return FlopCount(masked=flops, dense=flops)


def build_model(cfg: FinetuneConfig) -> ConvNeXtV2:
    """The classifier of a fine-tuning config (the stage contract's ``build_model``, :mod:`trainer.stages`), before
    pretrained weights and the new head's initialization."""
    model = build(
        cfg.model.size, num_classes=cfg.model.num_classes, drop_path=cfg.model.drop_path, block=cfg.model.block
    )
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


@dataclass
class Best:
    """The best evaluation so far: top-1 (max of model and EMA), which of them, and the step."""

    top1: float = -math.inf
    source: str = ""
    step: int = 0


class FinetuneStage:
    """The classification fine-tuning stage (:class:`trainer.stages.Stage`)."""

    def __init__(self, cfg: FinetuneConfig, env: DistEnv, run_dir: Path, fresh: bool = True) -> None:
        self.cfg = cfg
        self.env = env
        self.run_dir = run_dir
        ft = cfg.finetune
        if ft.ema_decay is not None and cfg.deepspeed.zero_stage == 3:
            raise ValueError(
                "finetune.ema_decay is set but deepspeed.zero_stage=3 partitions the weights (the EMA would gather "
                "them every step): use deepspeed.zero_stage=1 or 2, or set finetune.ema_decay=null"
            )
        self.mixup: SeededMixup | None = None
        if ft.mixup > 0 or ft.cutmix > 0:
            if cfg.data.batch_size % 2:
                raise ValueError(
                    f"data.batch_size={cfg.data.batch_size} must be even with Mixup/CutMix (each sample is mixed "
                    "with its mirror in the batch); change it or set finetune.mixup=0 and finetune.cutmix=0"
                )
            self.mixup = mixup_fn(
                cfg.model.num_classes,
                mixup_alpha=ft.mixup,
                cutmix_alpha=ft.cutmix,
                label_smoothing=ft.label_smoothing,
                seed=cfg.seed,
            )
        self.soft_target_loss = SoftTargetCrossEntropy()

        model = build_model(cfg).to(env.device)
        if cfg.model.pretrained and fresh:  # on a resume the checkpoint replaces every weight
            load_pretrained(model, cfg.model.pretrained, cfg.model.size)
        init_head(model, ft.head_init_scale)
        self.probe = attach_probe(model) if ft.linear_probe else None
        if cfg.model.channels_last and env.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.flops: FlopCount | None = count_classifier_flops(model, cfg.data.image_size, env.device)
        # Copied before the engine casts the model to bf16, so the EMA stays fp32 (a bf16 EMA could not hold
        # updates of (1 - decay) * (w - ema)); timm's update promotes the bf16 weights.
        self.ema = ModelEmaV2(model, decay=ft.ema_decay) if ft.ema_decay is not None else None
        self.best = Best()

        train_url = cfg.data.train_url
        if env.is_main and isinstance(train_url, str) and not train_url.startswith("synthetic://"):
            listed = list_labeled_subset(train_url, run_dir / LABELED_FILE)
            if listed is not None:
                log.info("few-label training set: its %d labeled samples are listed in %s", listed, LABELED_FILE)
        self.loader = build_train_loader(
            cfg, env, run_dir, finetune_transform(cfg.data.image_size, auto_augment=ft.auto_augment, re_prob=ft.re_prob)
        )
        self.val_loader = build_eval_loader(
            cfg, env, run_dir, eval_transform(cfg.data.image_size, crop_pct=ft.crop_pct)
        )
        for url, loader in ((cfg.data.train_url, self.loader), (cfg.data.val_url, self.val_loader)):
            if not isinstance(loader, ShardLoader):  # synthetic://N: ten classes, no sources
                continue
            classes = loader.shards.num_classes
            if classes is not None and classes > cfg.model.num_classes:
                raise ValueError(f"{url} has {classes} classes but model.num_classes={cfg.model.num_classes}")
            for source in loader.shards.descriptions:
                exts = source.get("extensions", ["cls"])  # an index of foreign shards lists what its samples hold
                if "cls" not in exts and not (cfg.data.label_field and "json" in exts):
                    raise ValueError(
                        f"{url}: its samples carry no .cls label (members: {', '.join(exts)}); fine-tuning needs one "
                        "integer class per sample (pretraining does not): set data.label_field to the .json field "
                        "that holds it"
                    )

    def describe(self) -> str:
        """Size, classes, where the weights come from, the recipe's regularizers and the FLOPs per image."""
        cfg, ft = self.cfg, self.cfg.finetune
        assert self.flops is not None
        if ft.linear_probe:
            return (
                f"ConvNeXt V2-{cfg.model.size} linear probe ({cfg.model.num_classes} classes) on the frozen trunk of "
                f"{cfg.model.pretrained or 'random init'} | BatchNorm (no affine) + linear head, SGD momentum 0.9 | "
                f"EMA {ft.ema_decay or 'off'} | smoothing {ft.label_smoothing}"
            )
        return (
            f"ConvNeXt V2-{cfg.model.size} fine-tune ({cfg.model.num_classes} classes) from "
            f"{cfg.model.pretrained or 'random init'} | layer decay {ft.layer_decay} per {ft.layer_decay_grouping} | "
            f"EMA {ft.ema_decay or 'off'} | mixup {ft.mixup} cutmix {ft.cutmix} smoothing {ft.label_smoothing} | "
            f"{self.flops.dense / 1e9:.2f} GFLOPs/img train"
        )

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW over no-decay and layer-decay groups; a linear probe: SGD with momentum over the head."""
        ft = self.cfg.finetune
        if ft.linear_probe:
            return build_sgd(self.model, self.cfg.optim)
        grouping = ft.layer_decay_grouping
        scales = lr_scales(self.model.layer_ids(grouping), self.model.num_layers(grouping), ft.layer_decay)
        return build_optimizer(self.model, self.cfg.optim, lr_scale=scales)

    def loss(self, engine: Any, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """Cross entropy against Mixup/CutMix soft targets, or label-smoothed hard labels when both are off."""
        images, labels = batch.images, torch.as_tensor(batch.labels).to(self.env.device, non_blocking=True)
        if self.cfg.model.channels_last and self.env.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        if self.mixup is None:
            logits = engine(images)
            return F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.finetune.label_smoothing)
        # One draw per micro-batch: the micro-step index is unique across steps and accumulation.
        micro_step = step * self.cfg.deepspeed.grad_accum + micro
        images, targets = self.mixup(images, labels, step=micro_step, rank=self.env.rank)
        return self.soft_target_loss(engine(images).float(), targets)

    def before_step(self, engine: Any, step: int) -> None:
        """Nothing begins at a step in this stage."""

    def after_step(self, engine: Any, step: int, skipped: bool) -> None:
        """Average a probe's BatchNorm statistics over the ranks (every rank then holds the same, as the checkpoint
        does); update the EMA from the new weights (a skipped step changed nothing)."""
        if self.probe is not None and dist.is_initialized() and dist.get_world_size() > 1:
            for stats in self.probe.stats:
                dist.all_reduce(stats)
                stats.div_(dist.get_world_size())
        if self.ema is not None and not skipped:
            self.ema.update(self.model)

    def evaluate(self, passes: EvalPasses, step: int) -> Evaluation:
        """Top-1/top-5 over the whole validation set (each rank its slice, counts summed); keep the best."""
        model = self.model
        counts = torch.zeros(5, dtype=torch.float64, device=self.env.device)  # top1, top5, n, ema top1, ema top5

        def score(batch: Batch) -> None:
            labels = torch.as_tensor(batch.labels).to(self.env.device, non_blocking=True)
            counts[:3] += eval_counts(model(batch.images), labels)
            if self.ema is not None:
                counts[3:] += eval_counts(self.ema.module(batch.images), labels)[:2]

        if not passes.run(self.val_loader, score):
            return Evaluation()
        if dist.is_initialized():
            dist.all_reduce(counts)
        total = int(counts[2])
        top1, top5, ema_top1, ema_top5 = (100.0 * counts[[0, 1, 3, 4]] / max(total, 1)).tolist()
        metrics = {"top1": top1, "top5": top5}
        if self.ema is not None:
            metrics.update(ema_top1=ema_top1, ema_top5=ema_top5)
        metrics["val_images"] = float(total)
        # Without an EMA its counts stay zero, so the model is the candidate.
        candidate = Best(top1, "model", step) if top1 >= ema_top1 else Best(ema_top1, "ema", step)
        if candidate.top1 > self.best.top1:
            self.best = candidate
            if self.env.is_main:
                self._save_best()
        return Evaluation(metrics)

    def _save_best(self) -> None:
        weights = self.ema.module if self.best.source == "ema" and self.ema is not None else self.model
        path = RunDir(self.run_dir).export / "best.safetensors"
        extra = {"source": self.best.source, "step": str(self.best.step), "top1": f"{self.best.top1:.4f}"}
        write_weights(path, classifier_state(weights), {**self._metadata(), **extra})

    def _metadata(self) -> dict[str, str]:
        cfg = self.cfg
        return {"size": cfg.model.size, "num_classes": str(cfg.model.num_classes), "stage": "finetune"}

    def export(self, out_dir: Path, summary: dict[str, Any]) -> None:
        """``model.safetensors`` (final weights, for ``build(size, num_classes)``), ``ema.safetensors``,
        ``metrics.json`` (the loop's summary with the last evaluation, plus the best top-1)."""
        meta = {**self._metadata(), "step": str(summary.get("steps", ""))}
        write_weights(out_dir / "model.safetensors", classifier_state(self.model), meta)
        if self.ema is not None:
            write_weights(out_dir / "ema.safetensors", classifier_state(self.ema.module), meta)
        top1 = self.best.top1 if self.best.source else None  # None: never evaluated
        best = {"best_top1": top1, "best_source": self.best.source, "best_step": self.best.step}
        write_metrics(out_dir, {**summary, **best})

    def state_dict(self) -> dict[str, Any]:
        """The best evaluation (every rank) and the EMA weights (rank 0 only: they are the same on every rank)."""
        state: dict[str, Any] = {"best": asdict(self.best)}
        if self.ema is not None and self.env.is_main:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the best evaluation; rank 0 restores the EMA and broadcasts it (every rank must call this)."""
        self.best = Best(**state.get("best", {}))
        if self.ema is None:
            return
        if self.env.is_main:
            if "ema" in state:
                self.ema.module.load_state_dict(state["ema"])
            else:
                log.warning("the checkpoint holds no EMA weights: the EMA restarts from the resumed weights")
                self.ema.set(self.model)
        if dist.is_initialized() and self.env.world_size > 1:
            for tensor in self.ema.module.state_dict().values():
                dist.broadcast(tensor, src=0)
