"""``omniseg train CONFIG.yaml``: build data, model and trainer from one config and fit.

Config sections (see ``configs/*.yaml``):

* ``model``: builder name and kwargs (``name: deeplabv3plus``, ``backbone``, ``output_stride`` ...);
  ``class_weights: auto`` derives inverse-log-frequency weights from the training labels.
* ``data``: ``train`` and ``val`` dataset specs for :func:`omniseg.data.open_dataset`, plus
  ``batch_size``, ``num_workers``, ``hflip``, ``color_jitter``; for semantic models also
  ``crop_size``, ``scale_range``, ``cache`` (instance / panoptic models jitter scale through their
  own ``min_size`` list).

The model's ``task`` (semantic, instance, detection, panoptic) picks the data pipeline and the
validation metric; a model that takes ``categories`` gets the training set's table unless the
config gives ``categories`` or ``num_classes``.
* ``train``: ``epochs``, ``lr``, ``weight_decay``, ``backbone_lr_mult``, ``warmup_steps``,
  ``out_dir``, ``seed``, ``devices``, ``num_nodes``, ``strategy``, ``val_flip``, ``val_scale``
  (input scale of validation, for models trained on upscaled frames), ``precision``,
  ``threads``, ``max_steps``, ``max_time`` (``"DD:HH:MM:SS"`` wall-clock limit).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from omniseg.checkpoint import atomic_write_json, save_checkpoint
from omniseg.data import open_dataset
from omniseg.data.transforms import semantic_train_transform
from omniseg.engine.detection_data import SegmentsTrainSet, collate_lists
from omniseg.engine.module import SegmentationTask
from omniseg.engine.semantic_data import IGNORE, SemanticTrainSet
from omniseg.models import build_model, model_arguments


def class_weights_from_labels(train_set: SemanticTrainSet, num_classes: int) -> list[float]:
    """ENet's ``1 / ln(1.02 + p_c)`` weights from the training label frequencies."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for i in range(len(train_set)):
        _, label = train_set._cache[i] if train_set._cache is not None else train_set._load(i)
        counts += np.bincount(label[label != IGNORE].ravel(), minlength=num_classes)[:num_classes]
    freq = counts / max(counts.sum(), 1.0)
    weights = 1.0 / np.log(1.02 + freq)
    return (weights / weights.mean()).round(4).tolist()


class CheckpointAndCurves(Callback):
    """After every epoch: ``last.ckpt`` (full state, atomic), best weights as safetensors, a curve PNG."""

    def __init__(self, out_dir: Path, model_config: dict, categories, recipe: dict) -> None:
        self.out_dir = out_dir
        self.model_config = model_config
        self.categories = categories
        self.recipe = recipe
        self.best = -math.inf

    # saved in last.ckpt, so that a resumed run keeps comparing against the true best
    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = float(state_dict.get("best", -math.inf))

    def on_train_epoch_end(self, trainer: L.Trainer, module: SegmentationTask) -> None:
        tmp = self.out_dir / ".last.ckpt.tmp"
        trainer.save_checkpoint(tmp)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            os.replace(tmp, self.out_dir / "last.ckpt")
            val = module.last_val
            if val and val["score"] > self.best:
                self.best = val["score"]
                save_checkpoint(
                    self.out_dir / "best",
                    module.model,
                    model_config=self.model_config,
                    categories=self.categories,
                    extra={
                        "epoch": trainer.current_epoch,
                        "val": {k: v for k, v in val.items() if k != "score"},
                        "recipe": self.recipe,
                    },
                )
            module.last_val = {}  # a later epoch without validation must not re-save these weights
            plot_training_curves(sorted((self.out_dir / "logs").glob("version_*/metrics.csv")),
                                 self.out_dir / "training_curve.png", module.monitor)

    def on_train_end(self, trainer: L.Trainer, module: SegmentationTask) -> None:
        # Cheap guard for multi-process training: every rank must end with the same weights.
        digest = hashlib.sha256()
        for value in module.model.state_dict().values():
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digests = [digest.hexdigest()]
        if trainer.world_size > 1:
            digests = [None] * trainer.world_size
            torch.distributed.all_gather_object(digests, digest.hexdigest())
        if trainer.is_global_zero and self.best == -math.inf:
            # never validated: the final weights are the only candidate
            save_checkpoint(
                self.out_dir / "best", module.model, model_config=self.model_config, categories=self.categories,
                extra={"epoch": trainer.current_epoch, "val": None, "recipe": self.recipe},
            )  # fmt: skip
        if trainer.is_global_zero:
            atomic_write_json(
                self.out_dir / "ranks.json",
                {"world_size": trainer.world_size, "weights_sha256": digests, "identical": len(set(digests)) == 1},
            )


def plot_training_curves(metrics_csvs: list[Path], out_png: Path, monitor: str = "miou") -> None:
    """Train loss and the validation metric per epoch, across every (resumed) run segment."""
    if not metrics_csvs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_x, loss_y, val_x, val_y = [], [], [], []
    for metrics_csv in metrics_csvs:
        with open(metrics_csv) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss_epoch"):
                    loss_x.append(int(row["epoch"]))
                    loss_y.append(float(row["train/loss_epoch"]))
                if row.get(f"val/{monitor}"):
                    val_x.append(int(row["epoch"]))
                    val_y.append(float(row[f"val/{monitor}"]) * 100)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(loss_x, loss_y, color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    label = {"miou": "mIoU", "mask_ap": "mask AP", "box_ap": "box AP", "pq": "PQ"}.get(monitor, monitor)
    ax2.plot(val_x, val_y, color="tab:red", marker=".", label=f"val {label}")
    ax2.set_ylabel(f"val {label} (%)")
    fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    tmp = out_png.with_name("." + out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)


def _semantic_train_set(train_ds, data_cfg: dict) -> SemanticTrainSet:
    short_side = int(data_cfg.get("short_side") or train_ds.load_pair(0)[0].shape[0])
    transform = semantic_train_transform(
        crop_size=data_cfg.get("crop_size"),
        short_side=short_side,
        scale_range=data_cfg.get("scale_range", (0.75, 1.5)),
        hflip=data_cfg.get("hflip", True),
        color_jitter=data_cfg.get("color_jitter", 0.2),
        ignore_index=IGNORE,
    )
    return SemanticTrainSet(train_ds, transform, cache=bool(data_cfg.get("cache", False)))


def _loaders(task: str, train_ds, train_set, data_cfg: dict) -> tuple[DataLoader, DataLoader | None]:
    workers = int(data_cfg.get("num_workers", 0))
    batch_size = int(data_cfg.get("batch_size", 8))
    val_batch_size = int(data_cfg.get("val_batch_size", 4))
    if task == "semantic":
        train_set = train_set or _semantic_train_set(train_ds, data_cfg)
        val_set = (
            SemanticTrainSet(open_dataset(data_cfg["val"]), None, cache=bool(data_cfg.get("cache", False)))
            if data_cfg.get("val")
            else None
        )
        collate = None
    else:
        train_set = SegmentsTrainSet(
            train_ds, task, hflip=data_cfg.get("hflip", True), color_jitter=data_cfg.get("color_jitter", 0.0)
        )
        val_set = SegmentsTrainSet(open_dataset(data_cfg["val"]), task, evaluation=True) if data_cfg.get("val") else None
        if val_set is not None and val_set.categories.ids != train_set.categories.ids:
            raise ValueError(
                f"validation categories {val_set.categories.ids} differ from training {train_set.categories.ids}"
            )
        collate = collate_lists
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, collate_fn=collate,
    )  # fmt: skip
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, batch_size=val_batch_size, num_workers=0, collate_fn=collate)
    return train_loader, val_loader


def build_training(config: dict) -> tuple[L.Trainer, SegmentationTask, DataLoader, DataLoader | None, Path]:
    data_cfg = config.get("data", {})
    train_cfg = config.get("train", {})
    model_cfg = dict(config["model"])
    out_dir = Path(train_cfg.get("out_dir", "runs/train"))
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(train_cfg.get("seed", 0)), workers=True, verbose=False)

    train_ds = open_dataset(data_cfg["train"])
    categories = train_ds.categories
    if "categories" in model_arguments(model_cfg["name"]):
        if "categories" not in model_cfg and "num_classes" not in model_cfg:
            model_cfg["categories"] = categories.to_dicts()
    else:
        model_cfg.setdefault("num_classes", len(categories))
    train_set = None
    if model_cfg.get("class_weights") == "auto":
        train_set = _semantic_train_set(train_ds, data_cfg)
        model_cfg["class_weights"] = class_weights_from_labels(train_set, model_cfg["num_classes"])
    model = build_model(model_cfg)
    task = getattr(model, "task", "semantic")
    # the checkpoint records every builder argument (defaults included), and carries all weights itself
    model_cfg = {k: v for k, v in getattr(model, "config", model_cfg).items() if k != "pretrained_backbone"}
    train_loader, val_loader = _loaders(task, train_ds, train_set, data_cfg)

    epochs = int(train_cfg.get("epochs", 10))
    devices = int(train_cfg.get("devices", 1))
    steps_per_epoch = max(len(train_loader) // devices, 1)
    module = SegmentationTask(
        model,
        task=task,
        categories=categories,
        num_classes=model_cfg.get("num_classes") if task == "semantic" else None,
        lr=float(train_cfg.get("lr", 1e-3)),
        weight_decay=float(train_cfg.get("weight_decay", 1e-4)),
        backbone_lr_mult=float(train_cfg.get("backbone_lr_mult", 1.0)),
        warmup_steps=int(train_cfg.get("warmup_steps", 0)),
        total_steps=epochs * steps_per_epoch,
        poly_power=float(train_cfg.get("poly_power", 0.9)),
        val_flip=bool(train_cfg.get("val_flip", False)),
        val_scale=float(train_cfg.get("val_scale", 1.0)),
    )
    # auto-numbered versions: a resumed run appends logs/version_N instead of overwriting history
    loggers: list = [CSVLogger(out_dir, name="logs")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="tb"))
    except ImportError:
        pass
    recipe = {"data": data_cfg, "train": train_cfg}
    trainer = L.Trainer(
        max_epochs=epochs,
        max_steps=int(train_cfg.get("max_steps", -1)),
        max_time=train_cfg.get("max_time"),  # "DD:HH:MM:SS": a hard wall-clock budget
        accelerator=train_cfg.get("accelerator", "auto"),
        devices=devices,
        num_nodes=int(train_cfg.get("num_nodes", 1)),
        strategy=train_cfg.get("strategy", "auto"),
        precision=train_cfg.get("precision", "32-true"),
        logger=loggers,
        callbacks=[CheckpointAndCurves(out_dir, model_cfg, categories, recipe)],
        enable_checkpointing=False,
        check_val_every_n_epoch=int(train_cfg.get("val_every", 1)),
        num_sanity_val_steps=0,
        log_every_n_steps=int(train_cfg.get("log_every", 10)),
        enable_progress_bar=bool(train_cfg.get("progress_bar", True)),
        enable_model_summary=False,
        deterministic=False,
    )
    atomic_write_json(out_dir / "config.resolved.json", {"model": model_cfg, "data": data_cfg, "train": train_cfg})
    return trainer, module, train_loader, val_loader, out_dir


def train(config: dict, *, resume: bool = False) -> Path:
    """Fit; returns the output directory (``best.safetensors``/``best.json``, ``last.ckpt``, logs, curve)."""
    threads = config.get("train", {}).get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    trainer, module, train_loader, val_loader, out_dir = build_training(config)
    ckpt_path = None
    if resume:
        ckpt_path = out_dir / "last.ckpt"
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"{ckpt_path}: nothing to resume from")
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    return out_dir
