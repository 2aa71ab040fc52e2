"""Detection transfer stage: Mask R-CNN + FPN on the pretrained ConvNeXt V2 trunk, COCO box and mask AP.

Training streams COCO-style shards (written by ``data.write_shards --source coco``) through the shard loader with
a per-sample transform: large-scale jitter to ``data.image_size`` (factor in ``[detection.min_scale,
detection.max_scale]``) and a flip, drawn from (run seed, epoch, sample position) like the classification crops.
The step loss is the sum of torchvision's Mask R-CNN losses (RPN objectness and boxes, RoI classes, boxes, masks).
AdamW uses the official ConvNeXt detection layer-wise lr decay: stem 0, stage 1 -> 1, stage 2 -> 2, stage 3 in
groups of three blocks, stage 4 last; the per-level norms, FPN and heads train at the full lr.

Evaluation: each rank runs its slice of ``data.val_url`` (fit-and-pad to ``data.image_size``), predictions are
mapped back to stored-image pixels and gathered to rank 0, which scores them with pycocotools' COCOeval against the
ground truth rebuilt from the same shards' ``.json`` (so an S3 validation set needs no separate annotation file).
AP on shards written with ``--image-size`` is measured at that resolution; write the validation shards at full
size to compare with published COCO numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection import MaskRCNN

from data.batch import Batch
from data.detection_transforms import EvalImage, LargeScaleJitter, ResizePad
from data.loader import ShardLoader
from models.detection import ConvNeXtV2FPN, build_mask_rcnn, layer_ids
from trainer.config import DetectionConfig
from trainer.distributed import DistEnv, gather_lists
from trainer.evaluation import EvalPasses, Evaluation
from trainer.export import write_metrics, write_weights
from trainer.loaders import build_eval_loader, build_train_loader
from trainer.optim import build_optimizer, lr_scales
from trainer.stages.pretrained import load_detector_backbone

COCO_STATS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
"""Names of the first six ``COCOeval.stats`` (AP at IoU .5:.95, .5, .75; small, medium, large objects)."""
MASK_THRESHOLD = 0.5


def sampled_rois(image_size: int) -> int:
    """RoIs sampled per training image for the box and mask heads: torchvision's 512 at the paper's 1024 px, fewer
    on small canvases, which hold few objects and would otherwise spend most compute on redundant RoIs."""
    return max(64, min(512, image_size // 2))


def coco_detections(output: dict[str, torch.Tensor], image: EvalImage, category_ids: Sequence[int]) -> list[dict]:
    """COCO results of one image: boxes ``xywh`` and RLE masks in stored-image pixels, scores, category ids."""
    if len(output["boxes"]) == 0:
        return []
    boxes = output["boxes"].float().cpu() / image.scale
    boxes[:, 2:] -= boxes[:, :2]
    h, w = image.resized
    masks = output["masks"][:, :, :h, :w].float()
    if (h, w) != (image.height, image.width):
        masks = F.interpolate(masks, size=(image.height, image.width), mode="bilinear", align_corners=False)
    binary = (masks[:, 0] > MASK_THRESHOLD).to(torch.uint8).cpu().numpy()
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return [
        {
            "image_id": image.image_id,
            "category_id": int(category_ids[int(label) - 1]),
            "bbox": [round(float(v), 2) for v in box],
            "score": float(score),
            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        }
        for box, label, score, rle in zip(boxes, output["labels"], output["scores"], rles, strict=True)
    ]


def coco_metrics(
    images: Sequence[EvalImage], detections: Sequence[dict], categories: Sequence[dict]
) -> dict[str, float]:
    """COCOeval box and mask AP (``box_ap``, ``box_ap50``, ..., ``mask_ap_large``); -1 where COCO has no ground
    truth to score (e.g. no large objects). Images seen twice (padded or replacement slots) count once."""
    unique: dict[int, EvalImage] = {}
    for image in images:
        unique.setdefault(image.image_id, image)
    annotations: list[dict[str, Any]] = []
    for image in unique.values():
        for ann in image.annotations:
            annotations.append({**ann, "id": len(annotations) + 1, "image_id": image.image_id})
    dataset = {
        "images": [{"id": im.image_id, "height": im.height, "width": im.width} for im in unique.values()],
        "annotations": annotations,
        "categories": [{"id": int(c["id"]), "name": c.get("name", str(c["id"]))} for c in categories],
    }
    metrics: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
            results = copy.deepcopy(list(detections))
            if iou_type == "segm":
                for r in results:
                    r.pop("bbox")  # so that loadRes takes areas from the masks, not the boxes
            dt = gt.loadRes(results) if results else _no_results(gt)
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            metrics.update({f"{prefix}_{name}": float(evaluator.stats[i]) for i, name in enumerate(COCO_STATS)})
    return metrics


def _no_results(gt: COCO) -> COCO:
    """An empty result set (``loadRes`` cannot take an empty list): every AP with ground truth is then 0."""
    dt = COCO()
    dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
    dt.createIndex()
    return dt


def build_model(cfg: DetectionConfig) -> MaskRCNN:
    """The detector of a detection config (the stage contract's ``build_model``, :mod:`trainer.stages`), before the
    pretrained backbone is loaded."""
    det, size = cfg.detection, cfg.data.image_size
    model = build_mask_rcnn(
        cfg.model.size,
        cfg.model.num_classes,
        drop_path=cfg.model.drop_path,
        anchor_sizes=det.anchor_sizes,
        fpn_channels=det.fpn_channels,
        min_size=size,
        max_size=size,
        detections_per_image=det.detections_per_image,
        rois_per_image=sampled_rois(size),
    )
    backbone = model.backbone
    assert isinstance(backbone, ConvNeXtV2FPN)
    backbone.body.trunk.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model


class DetectionStage:
    """The Mask R-CNN stage (:class:`trainer.stages.Stage`)."""

    def __init__(self, cfg: DetectionConfig, env: DistEnv, run_dir: Path, fresh: bool = True) -> None:
        self.cfg = cfg
        self.env = env
        self.run_dir = run_dir
        det, size = cfg.detection, cfg.data.image_size
        self.loader = build_train_loader(
            cfg, env, run_dir, sample_transform=LargeScaleJitter(size, det.min_scale, det.max_scale)
        )
        # Every validation image once over all ranks; slots that pad the last batches come as None targets.
        self.val_loader = build_eval_loader(cfg, env, run_dir, sample_transform=ResizePad(size))
        self.categories = self._categories()
        model = build_model(cfg)
        if cfg.model.pretrained and fresh:  # on a resume the checkpoint replaces every weight
            load_detector_backbone(model, cfg.model.pretrained, cfg.model.size)
        self.model = model.to(env.device)
        self.flops = None  # MFU is not reported: RoI counts vary per image

    def _categories(self) -> list[dict[str, Any]]:
        """The validation set's COCO categories in label order; checked against ``model.num_classes``."""
        assert isinstance(self.val_loader, ShardLoader)  # synthetic data is refused for detection
        described = self.val_loader.shards.descriptions[0] if self.val_loader.shards.descriptions else {}
        categories = sorted(described.get("categories") or [], key=lambda c: int(c["label"]))
        if not categories:
            raise ValueError(
                f"data.val_url={self.cfg.data.val_url}: the manifest lists no categories; write detection shards "
                "with python -m data.write_shards --source coco"
            )
        if len(categories) != self.cfg.model.num_classes:
            raise ValueError(
                f"model.num_classes={self.cfg.model.num_classes} but the validation set has {len(categories)} "
                f"categories: set model.num_classes={len(categories)}"
            )
        return categories

    def describe(self) -> str:
        """Detector, backbone, input size and where the backbone weights come from."""
        det = self.cfg.detection
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (
            f"Mask R-CNN FPN-{det.fpn_channels} on ConvNeXt V2-{self.cfg.model.size} ({params:.1f}M params, "
            f"{self.cfg.model.num_classes} classes) | {self.cfg.data.image_size} px LSJ {det.min_scale}-"
            f"{det.max_scale} | layer decay {det.layer_decay} | backbone from {self.cfg.model.pretrained or 'scratch'}"
        )

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW with layer-wise lr decay over the trunk; no weight decay on biases, norms and GRN."""
        ids, top = layer_ids(self.model)
        return build_optimizer(self.model, self.cfg.optim, lr_scales(ids, top, self.cfg.detection.layer_decay))

    def loss(self, engine: Any, batch: Batch, step: int, micro: int) -> torch.Tensor:
        """Sum of the Mask R-CNN losses of one micro-batch."""
        device = self.env.device
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in batch.labels]
        losses = engine(list(batch.images), targets)
        return torch.stack(list(losses.values())).sum()

    def before_step(self, engine: Any, step: int) -> None:
        """Nothing begins at a step in this stage."""

    def after_step(self, engine: Any, step: int, skipped: bool) -> None:
        """Nothing to do after a detection step."""

    def evaluate(self, passes: EvalPasses, step: int) -> Evaluation:
        """COCO box and mask AP on ``data.val_url`` (rank 0 scores what every rank predicted)."""
        category_ids = [int(c["id"]) for c in self.categories]
        images: list[EvalImage] = []
        detections: list[dict] = []

        def predict(batch: Batch) -> None:
            outputs = self.model(list(batch.images))
            for output, info in zip(outputs, batch.labels, strict=True):
                if info is None:  # a slot that pads the last batch
                    continue
                images.append(info)
                detections.extend(coco_detections(output, info, category_ids))

        if not passes.run(self.val_loader, predict):
            return Evaluation()
        all_images, all_detections = gather_lists(images), gather_lists(detections)
        if not self.env.is_main:
            return Evaluation()
        metrics = coco_metrics(all_images, all_detections, self.categories)
        # Distinct images scored: the whole validation set, whatever the world size and padding.
        metrics["eval_images"] = float(len({image.image_id for image in all_images}))
        return Evaluation(metrics)

    def export(self, out_dir: Path, summary: dict[str, Any]) -> None:
        """``model.safetensors``: the detector (``build_mask_rcnn`` arguments in its metadata); ``metrics.json``."""
        cfg, det = self.cfg, self.cfg.detection
        meta = {
            "stage": "detection",
            "size": cfg.model.size,
            "num_classes": str(cfg.model.num_classes),
            "fpn_channels": str(det.fpn_channels),
            "anchor_sizes": json.dumps(list(det.anchor_sizes)),
            "image_size": str(cfg.data.image_size),
            "categories": json.dumps(self.categories),
        }
        write_weights(out_dir / "model.safetensors", self.model.state_dict(), meta)
        write_metrics(out_dir, summary)

    def state_dict(self) -> dict[str, Any]:
        """No state beyond the engine and the loader (the validation loader restarts every evaluation)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """No state beyond the engine and the loader."""
