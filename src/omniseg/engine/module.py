"""The Lightning module every omniseg method trains through.

It owns optimisation (AdamW, warm-up + poly decay), logging, validation metrics and the RNG
state that ``--resume`` needs; the model owns its losses (``model(images, targets)`` returns a
dict of named losses) and its inference (``model(images)``: logits for semantic models,
``list[Segments]`` for the others).

Validation metric per task (the one that picks the best checkpoint, :attr:`SegmentationTask.monitor`):
semantic -> mIoU; instance -> COCO mask AP; detection -> COCO box AP; panoptic -> PQ.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omniseg.metrics import SemanticMetric, segments_metric, update_segments_metric
from omniseg.structures import CategoryTable

MONITOR = {"semantic": "miou", "instance": "mask_ap", "detection": "box_ap", "panoptic": "pq"}


class SegmentationTask(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        *,
        task: str = "semantic",
        categories: CategoryTable | None = None,
        num_classes: int | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        backbone_lr_mult: float = 1.0,
        warmup_steps: int = 0,
        total_steps: int = 1,
        poly_power: float = 0.9,
        val_flip: bool = False,
        val_scale: float = 1.0,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if task not in MONITOR:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(MONITOR)}")
        if task == "semantic" and num_classes is None:
            raise ValueError("a semantic task needs num_classes")
        if task != "semantic" and categories is None:
            raise ValueError(f"a {task} task needs the dataset's categories")
        self.model = model
        self.task = task
        self.categories = categories
        self.monitor = MONITOR[task]
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.backbone_lr_mult = backbone_lr_mult
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)
        self.poly_power = poly_power
        self.val_flip = val_flip
        self.val_scale = val_scale
        self.ignore_index = ignore_index
        self.metric = self._new_metric()
        self.last_val: dict = {}

    def _new_metric(self):
        if self.task == "semantic":
            return SemanticMetric(self.num_classes, ignore_index=self.ignore_index)
        return segments_metric(self.task, self.categories)

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.task == "semantic":
            images, labels = batch
            losses = self.model(images, {"semantic": labels})
        else:
            images, targets = batch[:2]
            losses = self.model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} ({ {k: float(v) for k, v in losses.items()} }); "
                "stopping. The last good checkpoint is left untouched."
            )
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        self.log("lr", self.optimizers().param_groups[-1]["lr"], on_step=True, on_epoch=False)
        return loss

    # ---------------------------------------------------------------- validation
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        if self.val_scale != 1.0:
            images = F.interpolate(images, scale_factor=self.val_scale, mode="bilinear", align_corners=False)
        logits = self.model(images)
        if self.val_flip:
            logits = logits + self.model(images.flip(-1)).flip(-1)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def on_validation_epoch_start(self) -> None:
        self.metric = self._new_metric()

    def validation_step(self, batch, batch_idx: int) -> None:
        if self.task == "semantic":
            images, labels = batch
            pred = self.predict_logits(images).argmax(1)
            self.metric.update(pred.cpu().numpy(), labels.cpu().numpy())
            return
        images, _, gts, image_ids = batch
        for image_id, gt, pred in zip(image_ids, gts, self.model(images), strict=True):
            update_segments_metric(self.metric, image_id, gt, pred)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, self.metric)
            merged = gathered[0]
            for other in gathered[1:]:
                merged.merge(other)
            self.metric = merged
        result = self.metric.compute()
        if self.task == "semantic":
            scalars = {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"]}
        elif self.task == "panoptic":
            scalars = {"pq": result["All"]["pq"], "pq_things": result["Things"]["pq"], "pq_stuff": result["Stuff"]["pq"]}
        else:
            scalars = {
                "mask_ap": max(result["segm"]["AP"], 0.0), "mask_ap50": max(result["segm"]["AP50"], 0.0),
                "box_ap": max(result["bbox"]["AP"], 0.0), "box_ap50": max(result["bbox"]["AP50"], 0.0),
            }  # fmt: skip
            if self.task == "detection":  # box-only models: their "masks" are filled boxes
                scalars = {k: v for k, v in scalars.items() if k.startswith("box")}
        self.last_val = {"score": float(scalars[self.monitor]), **{k: float(v) for k, v in scalars.items()}}
        if self.task == "semantic":
            self.last_val["per_class_iou"] = list(map(float, result["per_class_iou"]))
        for name, value in scalars.items():
            self.log(f"val/{name}", float(value), prog_bar=name == self.monitor, sync_dist=False)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        backbone, rest = [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (backbone if name.startswith("backbone.") else rest).append(param)
        groups = [{"params": rest, "lr": self.lr}]
        if backbone:
            groups.insert(0, {"params": backbone, "lr": self.lr * self.backbone_lr_mult})
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
            return (1.0 - progress) ** self.poly_power

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------- exact resume
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["omniseg_rng"] = {
            "torch": torch.get_rng_state(),
            # numpy's state as tensors/ints: Lightning reloads checkpoints with weights_only=True
            "numpy": _numpy_state_to_tensors(np.random.get_state()),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("omniseg_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(rng["python"])


def _numpy_state_to_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)
