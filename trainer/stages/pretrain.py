"""FCMAE pretraining stage: streaming shards -> masked ConvNeXt V2 -> normalized-pixel loss on masked patches.

Masks come from (run seed, epoch, sample key), so every world size and every restart draws the same mask for a
sample. Evaluation logs a reconstruction grid of a fixed batch, the paper's feature cosine-distance statistic for
each of the four stages and, with ``eval.knn_bank_url``, the kNN top-1 and effective rank
(:mod:`trainer.observability.probes`); the export is the encoder in the layout ``build(size, num_classes=0)``
loads, plus the whole FCMAE.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path
from typing import Any

import torch

from data.batch import Batch
from data.sampling import derive_seed
from data.transforms import eval_transform, pretrain_transform
from models.convnextv2 import ConvNeXtV2Encoder, build_encoder
from models.fcmae import FCMAE
from models.masking import random_mask
from trainer.config import PretrainConfig
from trainer.distributed import DistEnv
from trainer.evaluation import EvalPasses, Evaluation
from trainer.export import write_metrics, write_weights
from trainer.loaders import build_eval_loader, build_train_loader
from trainer.observability.metrics import count_fcmae_flops
from trainer.observability.probes import effective_rank, knn_top1, labeled, loader_features, stage_outputs
from trainer.optim import build_optimizer, freeze_part, restart_part
from trainer.run_dir import RunDir
from trainer.stages.continuation import apply_init, cached_init
from trainer.stages.fcmae_eval import feature_cosine_distance, save_reconstructions

log = logging.getLogger(__name__)

TAG_MASK = 21
TAG_RANDOM_ENCODER = 23
ENCODER = "encoder"
"""The FCMAE's encoder: its parameters' names start with it; the optimizer's part the decoder warm-up freezes."""


def sample_masks(keys: list[str], seed: int, epoch: int, num_patches: int, ratio: float) -> torch.Tensor:
    """One mask per sample, drawn from (seed, epoch, sample key): the same on any world size and after resume."""
    masks = []
    for key in keys:
        gen = torch.Generator().manual_seed(derive_seed(seed, TAG_MASK, epoch, zlib.crc32(key.encode())))
        masks.append(random_mask(1, num_patches, ratio, gen))
    return torch.cat(masks)


def random_encoder(cfg: PretrainConfig) -> ConvNeXtV2Encoder:
    """The kNN probe's baseline: an encoder of the run's architecture (size and block kind), randomly initialized
    from the run's seed (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, TAG_RANDOM_ENCODER))
        return build_encoder(cfg.model.size, block=cfg.model.block)


def build_model(cfg: PretrainConfig) -> FCMAE:
    """The FCMAE of a pretraining config (the stage contract's ``build_model``, :mod:`trainer.stages`), initialized
    from the current torch RNG state (the run seeds it with ``cfg.seed`` first, so the same call reproduces a
    run's initial weights)."""
    return FCMAE(
        cfg.model.size,
        mask_ratio=cfg.model.mask_ratio,
        decoder_dim=cfg.model.decoder_dim,
        decoder_depth=cfg.model.decoder_depth,
        norm_pix_loss=cfg.model.norm_pix_loss,
        backend=cfg.model.backend,
        drop_path=cfg.model.drop_path,
        block=cfg.model.block,
        sparse=cfg.model.sparse,
        grad_checkpointing=cfg.model.grad_checkpointing,
    )


class PretrainStage:
    """The FCMAE stage (:class:`trainer.stages.Stage`)."""

    def __init__(self, cfg: PretrainConfig, env: DistEnv, run_dir: Path, fresh: bool = True) -> None:
        self.cfg = cfg
        self.env = env
        self.run_dir = run_dir
        model = build_model(cfg)
        self.init_line = "random init"
        if cfg.model.init_from and fresh:
            init = cached_init(cfg, run_dir)
            apply_init(model, init)
            self.init_line = init.describe()
            if env.is_main:
                log.info("model.init_from: %s", self.init_line)
        elif cfg.model.init_from:  # the checkpoint replaces every weight
            self.init_line = f"{cfg.model.init_from} (resumed: the weights come from the checkpoint)"
        model = model.to(env.device)
        if cfg.model.channels_last and env.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.flops = count_fcmae_flops(model, cfg.data.image_size, env.device)
        if cfg.model.compile:
            model.compile()  # in place, after the eager FLOP count: the engine calls the compiled forward
        crop = pretrain_transform(cfg.data.image_size, scale=(cfg.data.min_scale, 1.0))
        # FCMAE needs no labels; its crop is made of torchvision v2 transforms, which take torchvision's decoded tensors
        self.loader = build_train_loader(cfg, env, run_dir, crop, require_labels=False, decode="tensor")
        grid = cfg.data.image_size // model.patch_size
        self.num_patches = grid * grid
        self.visible = model.visible_patches(grid, grid)
        self._eval_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bank_loader = self.val_loader = None
        if cfg.eval.knn_bank_url:  # the kNN probe: a labeled bank, the validation set as queries
            probe = eval_transform(cfg.data.image_size)
            bank = cfg.eval.knn_bank_url
            self.bank_loader = build_eval_loader(cfg, env, run_dir, probe, url=bank, decode="tensor")
            self.val_loader = build_eval_loader(cfg, env, run_dir, probe, decode="tensor")
        self.first_rank: float | None = None
        """The effective rank at the first evaluation: the reference of the collapse warning."""
        self.random_top1: float | None = None
        """The kNN top-1 of a randomly initialized encoder (measured once): the baseline pretraining must beat."""
        self.start_top1: float | None = None
        """With ``model.init_from``: the kNN top-1 of the encoder the run started from (measured once)."""
        self.warmup = cfg.schedule.decoder_warmup_steps

    def describe(self) -> str:
        """Size and the FLOPs the masked encoder really does per image."""
        assert self.flops is not None
        warmup = f" | decoder warm-up {self.warmup} steps" if self.warmup else ""
        return (
            f"FCMAE {self.cfg.model.size} ({self.cfg.model.backend}, mask {self.cfg.model.mask_ratio}) | "
            f"{self.flops.masked / 1e9:.2f} GFLOPs/img train (dense-equivalent {self.flops.dense / 1e9:.2f}) | "
            f"from {self.init_line}{warmup}"
        )

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW (0.9, 0.95) without weight decay on biases, norms and GRN; with a decoder warm-up the encoder's
        parameters form groups of their own (frozen, then restarted: :meth:`before_step`)."""
        part = (lambda name: ENCODER if name.startswith(f"{ENCODER}.") else "decoder") if self.warmup else None
        return build_optimizer(self.model, self.cfg.optim, part=part)

    def before_step(self, engine: Any, step: int) -> None:
        """The decoder warm-up: the encoder's groups frozen (lr 0) for the first ``decoder_warmup_steps`` steps;
        at the switch its AdamW state starts afresh, so the first encoder update is a first step (bias-corrected
        moments of one gradient), not one weighed against the warm-up's steps."""
        if not self.warmup:
            return
        freeze_part(engine.optimizer, ENCODER, frozen=step < self.warmup)
        if step == self.warmup:
            restarted = restart_part(engine.optimizer, ENCODER)
            if self.env.is_main:
                log.info("decoder warm-up done after %d steps: the encoder trains from now on (AdamW state of "
                         "%d encoder partition(s) restarted)", step, restarted)  # fmt: skip

    def loss(self, engine: Any, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """Masked-patch loss of one micro-batch."""
        images = batch.images
        masks = sample_masks(batch.keys, self.cfg.seed, batch.epoch, self.num_patches, self.cfg.model.mask_ratio)
        if self.cfg.model.channels_last and self.env.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        masks = masks.to(self.env.device)
        if self._eval_batch is None:
            self._eval_batch = (images[:8].detach().clone(), masks[:8].clone())
        loss, _, _ = engine(images, masks, visible=self.visible, train_encoder=step >= self.warmup)
        return loss

    def after_step(self, engine: Any, step: int, skipped: bool) -> None:
        """Nothing to do after an FCMAE step."""

    def evaluate(self, passes: EvalPasses, step: int) -> Evaluation:
        """Reconstructions of a fixed batch, the feature cosine-distance statistic of each encoder stage and, with a
        kNN bank, the kNN top-1 and effective rank (:meth:`_knn`)."""
        if self._eval_batch is None:
            return Evaluation()
        images, masks = self._eval_batch
        model = self.model
        _, pred, _ = model(images, masks, visible=self.visible)
        stages = stage_outputs(model.encoder, images)
        probes = self._knn(passes) if self.bank_loader is not None else Evaluation()
        if passes.stopped is not None or not self.env.is_main:
            return probes
        metrics = {f"feature_cosine_distance_s{i}": feature_cosine_distance(f) for i, f in enumerate(stages, start=1)}
        path = RunDir(self.run_dir).images / f"recon_{step:08d}.png"
        save_reconstructions(model, images, masks, pred, path)
        return Evaluation({**metrics, **probes.metrics}, [("reconstructions", path)], tags=probes.tags)

    def _knn(self, passes: EvalPasses) -> Evaluation:
        """kNN top-1 of the validation set against the bank, and the effective rank of its features: every rank
        embeds its slice, the features are gathered once."""
        ev = self.cfg.eval
        if self.random_top1 is None:  # the baseline, once: the same probe on a randomly initialized encoder
            embedded = self._embed(random_encoder(self.cfg).to(self.env.device).eval(), passes)
            if embedded is None:
                return Evaluation()
            self.random_top1 = knn_top1(*embedded, ev.knn_k, ev.knn_temperature)
        if self.start_top1 is None and self.cfg.model.init_from:  # and the encoder the run started from
            start = build_encoder(self.cfg.model.size, block=self.cfg.model.block)
            start.load_state_dict(cached_init(self.cfg, self.run_dir).encoder)
            embedded = self._embed(start.to(self.env.device).eval(), passes)
            if embedded is None:
                return Evaluation()
            self.start_top1 = knn_top1(*embedded, ev.knn_k, ev.knn_temperature)
        embedded = self._embed(self.model.encoder, passes)
        if embedded is None:
            return Evaluation()
        top1 = knn_top1(*embedded, ev.knn_k, ev.knn_temperature)
        queries = embedded[2]
        rank = effective_rank(queries)
        tags = {}
        if self.first_rank is None:
            self.first_rank = rank
        elif rank < ev.collapse_fraction * self.first_rank:
            message = f"effective rank {rank:.1f} < {ev.collapse_fraction:g} x its first value {self.first_rank:.1f}"
            if self.env.is_main:
                log.warning("feature collapse? %s", message)
            tags["collapse_warning"] = message
        metrics = {
            "knn_top1": top1,
            "knn_top1_random": self.random_top1,
            **({"knn_top1_start": self.start_top1} if self.start_top1 is not None else {}),
            "effective_rank": rank,
            "knn_images": float(len(queries)),
            "knn_bank_images": float(len(embedded[0])),
        }
        return Evaluation(metrics, tags=tags)

    def _embed(
        self, encoder: ConvNeXtV2Encoder, passes: EvalPasses
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """Bank features and labels, query features and labels (all ranks' slices, padding dropped) and the class
        count; None when a preemption stopped it."""
        assert self.bank_loader is not None and self.val_loader is not None
        sets = []
        for loader in (self.bank_loader, self.val_loader):
            embedded = loader_features(encoder, loader, passes)
            if embedded is None:
                return None
            sets.append(labeled(*embedded))
        (bank, bank_labels), (queries, query_labels) = sets
        classes = int(max(bank_labels.max(), query_labels.max())) + 1
        return bank, bank_labels, queries, query_labels, classes

    def export(self, out_dir: Path, summary: dict[str, Any]) -> None:
        """``model.safetensors``: the encoder for ``build(size, num_classes=0)``; ``fcmae.safetensors``: all."""
        model = self.model
        meta = {"size": model.size, "stage": "pretrain"}
        write_weights(out_dir / "model.safetensors", model.encoder_state_dict(), meta)
        write_weights(out_dir / "fcmae.safetensors", model.state_dict(), meta)
        images = sorted(RunDir(self.run_dir).images.glob("recon_*.png"))
        if images:
            (out_dir / "reconstructions.png").write_bytes(images[-1].read_bytes())
        write_metrics(out_dir, summary)

    def state_dict(self) -> dict[str, Any]:
        """The collapse warning's reference (the first evaluation's effective rank), the kNN baselines, and the
        fixed evaluation batch (the run's first 8 images and masks of this rank), so that a resumed run evaluates
        (and redoes an evaluation a preemption stopped) on the same images as the uninterrupted one."""
        batch = None if self._eval_batch is None else [t.cpu() for t in self._eval_batch]
        return {
            "first_rank": self.first_rank,
            "random_top1": self.random_top1,
            "start_top1": self.start_top1,
            "eval_batch": batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        first, random_top1 = state.get("first_rank"), state.get("random_top1")
        self.first_rank = None if first is None else float(first)
        self.random_top1 = None if random_top1 is None else float(random_top1)
        start = state.get("start_top1")
        self.start_top1 = None if start is None else float(start)
        batch = state.get("eval_batch")
        if batch is not None:
            self._eval_batch = (batch[0].to(self.env.device), batch[1].to(self.env.device))
