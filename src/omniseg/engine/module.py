"""The Lightning module every omniseg method trains through.

It owns optimisation (AdamW, warm-up + poly decay over steps or over a training-time budget), logging, validation metrics and the RNG
state that ``--resume`` needs; the model owns its losses (``model(images, targets)`` returns a
dict of named losses) and its inference (raw outputs, then ``model.post_process``, see
:mod:`omniseg.inference`). Validation runs the very inference ``omniseg evaluate`` runs, and
scores it with the metric of the task (:func:`omniseg.metrics.task_metrics.metric_for_task`);
that metric's ``monitor`` value picks the best checkpoint.
"""

from __future__ import annotations

import random
import time

import lightning as L
import numpy as np
import torch
from torch import nn

from omniseg.inference import TestTimeAugmentation, predict_segments, validate_task
from omniseg.metrics.task_metrics import TaskMetric, metric_for_task
from omniseg.optimize import optimize_for_inference
from omniseg.structures import CategoryTable


class SegmentationTask(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        *,
        categories: CategoryTable,
        task: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        backbone_lr_mult: float = 1.0,
        warmup_steps: int = 0,
        total_steps: int = 1,
        poly_power: float = 0.9,
        tta: TestTimeAugmentation | None = None,
        schedule_seconds: float | None = None,
        stop_step: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = validate_task(model, task)
        self.categories = categories
        self.tta = tta or TestTimeAugmentation()
        self.lr = lr
        self.weight_decay = weight_decay
        self.backbone_lr_mult = backbone_lr_mult
        self.warmup_steps = warmup_steps
        self.total_steps = max(total_steps, 1)
        self.poly_power = poly_power
        # A wall-clock budget: the poly decay runs over training seconds (validation excluded) and
        # training stops when they are spent, so a run on a busy or slow machine still ends its
        # schedule, and is validated, inside the budget instead of being cut mid-decay.
        self.schedule_seconds = float(schedule_seconds) if schedule_seconds else None
        # A step budget (``train.max_steps``): the decay runs over it and training stops there
        # through should_stop, so Lightning validates the final weights (its own max_steps stop
        # mid-epoch does not), and rows of an experiment get equal work whatever the machine's load.
        self.stop_step = stop_step if stop_step and stop_step > 0 else None
        self.train_seconds = 0.0
        self._batch_start: float | None = None
        self.metric: TaskMetric = metric_for_task(self.task, categories)
        self.monitor = self.metric.monitor
        self.last_val: dict = {}

    # ---------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            values = {k: float(v.detach()) for k, v in losses.items()}
            raise FloatingPointError(
                f"non-finite training loss at step {self.global_step} ({values}); "
                "stopping. The last good checkpoint is left untouched."
            )
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        self.log("lr", self.optimizers().param_groups[-1]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._batch_start is not None:
            self.train_seconds += time.perf_counter() - self._batch_start
        self.log("train/seconds", self.train_seconds, on_step=True, on_epoch=False)
        if self.schedule_seconds is not None and self.train_seconds >= self.schedule_seconds:
            self.trainer.should_stop = True  # Lightning then validates and ends the epoch
        if self.stop_step is not None and self.global_step >= self.stop_step:
            self.trainer.should_stop = True

    def schedule_progress(self, step: int) -> float:
        """Fraction of the decay done after warm-up: by steps, or by training seconds."""
        if self.schedule_seconds is not None:
            return min(self.train_seconds / self.schedule_seconds, 1.0)
        return min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.metric = metric_for_task(self.task, self.categories)
        # the inference `omniseg evaluate` runs, fast paths included (they act in eval mode without
        # autograd only, so training steps keep computing the plain path)
        optimize_for_inference(self.model)

    def validation_step(self, batch, batch_idx: int) -> None:
        images, gts, image_ids = batch
        preds = predict_segments(self.model, images, task=self.task, tta=self.tta)
        for image_id, gt, pred in zip(image_ids, gts, preds, strict=True):
            self.metric.update(image_id, gt, pred)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, self.metric)
            merged = gathered[0]
            for other in gathered[1:]:
                merged.merge(other)
            self.metric = merged
        result = self.metric.compute()
        scalars = self.metric.summary(result)
        self.last_val = {"score": float(scalars[self.monitor]), **{k: float(v) for k, v in scalars.items()}}
        if "per_class_iou" in result:
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
            return (1.0 - self.schedule_progress(step)) ** self.poly_power

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
        checkpoint["omniseg_train_seconds"] = self.train_seconds

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.train_seconds = float(checkpoint.get("omniseg_train_seconds", 0.0))
        rng = checkpoint.get("omniseg_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(rng["python"])


def _numpy_state_to_tensors(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)
