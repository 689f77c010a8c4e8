"""``omniseg train CONFIG.yaml``: build data, model and trainer from one config and fit.

Config sections (see ``configs/*.yaml``):

* ``model``: builder name and kwargs (``name: deeplabv3plus``, ``backbone``, ``output_stride`` ...);
  ``class_weights: auto`` derives inverse-log-frequency weights from the training labels.
* ``data``: ``train`` and ``val`` dataset specs for :func:`omniseg.data.open_dataset`, plus
  ``crop_size``, ``scale_range``, ``batch_size``, ``num_workers``, ``cache``.
* ``train``: ``epochs``, ``lr``, ``weight_decay``, ``backbone_lr_mult``, ``warmup_steps``,
  ``out_dir``, ``seed``, ``devices``, ``num_nodes``, ``strategy``, ``val_flip``, ``precision``.
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

from omniseg.data import open_dataset
from omniseg.data.transforms import semantic_train_transform
from omniseg.engine.checkpoint import atomic_write_json, save_checkpoint
from omniseg.engine.module import SemanticTask
from omniseg.engine.semantic_data import IGNORE, SemanticTrainSet
from omniseg.models import build_model


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

    def on_train_epoch_end(self, trainer: L.Trainer, module: SemanticTask) -> None:
        tmp = self.out_dir / ".last.ckpt.tmp"
        trainer.save_checkpoint(tmp)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            os.replace(tmp, self.out_dir / "last.ckpt")
            val = module.last_val
            if val and float(val["miou"]) > self.best:
                self.best = float(val["miou"])
                save_checkpoint(
                    self.out_dir / "best",
                    module.model,
                    model_config=self.model_config,
                    categories=self.categories,
                    extra={
                        "epoch": trainer.current_epoch,
                        "val": {"miou": float(val["miou"]), "per_class_iou": list(map(float, val["per_class_iou"])),
                                "pixel_accuracy": float(val["pixel_accuracy"])},
                        "recipe": self.recipe,
                    },
                )
            plot_training_curves(sorted((self.out_dir / "logs").glob("version_*/metrics.csv")),
                                 self.out_dir / "training_curve.png")

    def on_train_end(self, trainer: L.Trainer, module: SemanticTask) -> None:
        # Cheap guard for multi-process training: every rank must end with the same weights.
        digest = hashlib.sha256()
        for value in module.model.state_dict().values():
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        digests = [digest.hexdigest()]
        if trainer.world_size > 1:
            digests = [None] * trainer.world_size
            torch.distributed.all_gather_object(digests, digest.hexdigest())
        if trainer.is_global_zero:
            atomic_write_json(
                self.out_dir / "ranks.json",
                {"world_size": trainer.world_size, "weights_sha256": digests, "identical": len(set(digests)) == 1},
            )


def plot_training_curves(metrics_csvs: list[Path], out_png: Path) -> None:
    """Train loss and val mIoU per epoch, across every (resumed) run segment."""
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
                if row.get("val/miou"):
                    val_x.append(int(row["epoch"]))
                    val_y.append(float(row["val/miou"]) * 100)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(loss_x, loss_y, color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    ax2.plot(val_x, val_y, color="tab:red", marker=".", label="val mIoU")
    ax2.set_ylabel("val mIoU (%)")
    fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    tmp = out_png.with_name("." + out_png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_png)


def build_training(config: dict) -> tuple[L.Trainer, SemanticTask, DataLoader, DataLoader | None, Path]:
    data_cfg = config.get("data", {})
    train_cfg = config.get("train", {})
    model_cfg = dict(config["model"])
    out_dir = Path(train_cfg.get("out_dir", "runs/train"))
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(train_cfg.get("seed", 0)), workers=True, verbose=False)

    train_ds = open_dataset(data_cfg["train"])
    categories = train_ds.categories
    short_side = int(data_cfg.get("short_side") or train_ds.load_pair(0)[0].shape[0])
    transform = semantic_train_transform(
        crop_size=data_cfg.get("crop_size"),
        short_side=short_side,
        scale_range=data_cfg.get("scale_range", (0.75, 1.5)),
        hflip=data_cfg.get("hflip", True),
        color_jitter=data_cfg.get("color_jitter", 0.2),
        ignore_index=IGNORE,
    )
    cache = bool(data_cfg.get("cache", False))
    train_set = SemanticTrainSet(train_ds, transform, cache=cache)
    model_cfg.setdefault("num_classes", len(categories))
    if model_cfg.get("class_weights") == "auto":
        model_cfg["class_weights"] = class_weights_from_labels(train_set, model_cfg["num_classes"])
    model = build_model(model_cfg)
    # the checkpoint records every builder argument (defaults included), and carries all weights itself
    model_cfg = {k: v for k, v in getattr(model, "config", model_cfg).items() if k != "pretrained_backbone"}

    workers = int(data_cfg.get("num_workers", 0))
    batch_size = int(data_cfg.get("batch_size", 8))
    train_loader = DataLoader(
        train_set, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0,
    )
    val_loader = None
    if data_cfg.get("val"):
        val_set = SemanticTrainSet(open_dataset(data_cfg["val"]), None, cache=cache)
        val_loader = DataLoader(val_set, batch_size=int(data_cfg.get("val_batch_size", 4)), num_workers=0)

    epochs = int(train_cfg.get("epochs", 10))
    devices = int(train_cfg.get("devices", 1))
    steps_per_epoch = max(len(train_loader) // devices, 1)
    task = SemanticTask(
        model,
        num_classes=model_cfg["num_classes"],
        lr=float(train_cfg.get("lr", 1e-3)),
        weight_decay=float(train_cfg.get("weight_decay", 1e-4)),
        backbone_lr_mult=float(train_cfg.get("backbone_lr_mult", 1.0)),
        warmup_steps=int(train_cfg.get("warmup_steps", 0)),
        total_steps=epochs * steps_per_epoch,
        poly_power=float(train_cfg.get("poly_power", 0.9)),
        val_flip=bool(train_cfg.get("val_flip", False)),
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
    return trainer, task, train_loader, val_loader, out_dir


def train(config: dict, *, resume: bool = False) -> Path:
    """Fit; returns the output directory (``best.safetensors``/``best.json``, ``last.ckpt``, logs, curve)."""
    threads = config.get("train", {}).get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    trainer, task, train_loader, val_loader, out_dir = build_training(config)
    ckpt_path = None
    if resume:
        ckpt_path = out_dir / "last.ckpt"
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"{ckpt_path}: nothing to resume from")
    trainer.fit(task, train_loader, val_loader, ckpt_path=ckpt_path)
    return out_dir
