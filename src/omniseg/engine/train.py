"""``omniseg train CONFIG.yaml``: build data, model and trainer from one config and fit.

Config sections (see ``configs/*.yaml``):

* ``model``: builder name and kwargs (``name: deeplabv3plus``, ``backbone``, ``output_stride`` ...);
  ``class_weights: auto`` derives inverse-log-frequency weights from the training labels.
* ``data``: ``train`` and ``val`` dataset specs for :func:`omniseg.data.open_dataset`, plus
  ``batch_size``, ``val_batch_size``, ``num_workers``, ``cache``, and the augmentation every task
  shares (:func:`omniseg.data.transforms.train_transform`): ``scale_range`` (relative to each
  image), ``crop_size``, ``hflip``, ``color_jitter``. Detectors can also jitter scale through
  their own ``min_size`` list. ``repeat_factor_threshold: t`` samples frames with rare classes
  more often (LVIS repeat-factor sampling, :func:`repeat_factors`); absent, frames are shuffled
  uniformly.

The model's declared ``tasks`` (its first, or ``train.task``) pick the validation metric; a
model whose builder takes ``categories`` gets the training set's table unless the config gives
``categories`` or ``num_classes``.
* ``train``: ``epochs``, ``lr``, ``weight_decay``, ``backbone_lr_mult``, ``warmup_steps``,
  ``out_dir``, ``seed``, ``devices``, ``num_nodes``, ``strategy``, ``task``, ``val_flip``,
  ``val_scales`` (test-time scales of validation, e.g. ``[1.5]`` for models trained on upscaled
  frames; ``val_scale`` is the one-scale form), ``precision``,
  ``threads``, ``max_steps`` (a step budget: the LR decays over it, then training stops and
  validates), ``max_time`` (``"DD:HH:MM:SS"`` wall-clock limit), ``schedule_time``
  (a training-time budget, validation excluded: the LR decays over it, then training stops and
  validates — the way to end a schedule inside ``max_time`` on a machine of unknown speed).
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, WeightedRandomSampler

from omniseg.checkpoint import save_checkpoint
from omniseg.data import open_dataset
from omniseg.data.targets import SEGMENT_FIELDS
from omniseg.data.transforms import train_transform
from omniseg.engine.data import EvaluationSet, TrainingSet, collate
from omniseg.engine.module import SegmentationTask
from omniseg.inference import TestTimeAugmentation
from omniseg.io import atomic_path, atomic_write_json
from omniseg.models import attach_categories, build_model, model_arguments
from omniseg.structures import CategoryTable


def class_weights_from_labels(train_set: TrainingSet, num_classes: int) -> list[float]:
    """ENet's ``1 / ln(1.02 + p_c)`` weights from the training label frequencies."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for i in range(len(train_set)):
        label = train_set.raw(i)[1]["semantic"].numpy()
        counts += np.bincount(label[label < num_classes].ravel(), minlength=num_classes)[:num_classes]
    freq = counts / max(counts.sum(), 1.0)
    weights = 1.0 / np.log(1.02 + freq)
    return (weights / weights.mean()).round(4).tolist()


def repeat_factors(train_set: TrainingSet, num_classes: int, threshold: float) -> np.ndarray:
    """Per-frame sampling weights of repeat-factor sampling (Gupta et al., LVIS, 2019).

    A class seen (visible in the semantic map) in a fraction ``f_c`` of the training frames gets
    ``r_c = max(1, sqrt(threshold / f_c))``; a frame gets the largest ``r_c`` of its classes (1 when
    it shows none). Frames with trucks, trains or motorcycles are then drawn several times as
    often as frames of road and cars alone, without any crop being reweighted.
    """
    if threshold <= 0:
        raise ValueError(f"data.repeat_factor_threshold must be positive, got {threshold}")
    presence = np.zeros((len(train_set), num_classes), dtype=bool)
    for i in range(len(train_set)):
        label = train_set.raw(i)[1]["semantic"]
        ids = torch.unique(label).long()
        presence[i, ids[ids < num_classes].numpy()] = True
    # a class seen in no frame weighs no frame: its (clipped) factor is never read
    per_class = np.maximum(np.sqrt(threshold / np.maximum(presence.mean(axis=0), 1e-12)), 1.0)
    return np.where(presence, per_class, 1.0).max(axis=1, initial=1.0)


class CheckpointAndCurves(Callback):
    """After every epoch: ``last.ckpt`` (full state, atomic), best weights as safetensors, a curve PNG."""

    def __init__(
        self, out_dir: Path, model_config: dict, categories, recipe: dict, reference_size: tuple[int, int] | None
    ) -> None:
        self.out_dir = out_dir
        self.model_config = model_config
        self.categories = categories
        self.recipe = recipe
        self.reference_size = reference_size
        self.best = -math.inf

    # saved in last.ckpt, so that a resumed run keeps comparing against the true best
    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = float(state_dict.get("best", -math.inf))

    def on_train_epoch_end(self, trainer: L.Trainer, module: SegmentationTask) -> None:
        with atomic_path(self.out_dir / "last.ckpt", commit=trainer.is_global_zero) as tmp:
            trainer.save_checkpoint(tmp)
            trainer.strategy.barrier()
        if trainer.is_global_zero:
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
                        "task": module.task,
                        # evaluate / segment default to the test-time setting the figure was measured with
                        # and with the image size its scales are relative to (omniseg.inference.working_size)
                        "inference": {
                            "flip": module.tta.flip, "scales": list(module.tta.scales),
                            **({"reference_size": list(self.reference_size)} if self.reference_size else {}),
                        },  # fmt: skip
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
    """Train loss (per logged step, with a running mean) and the validation metric against the
    optimiser step, across every (resumed) run segment: a budgeted run may see one epoch or less."""
    if not metrics_csvs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_x, loss_y, val_x, val_y = [], [], [], []
    for metrics_csv in metrics_csvs:
        with open(metrics_csv) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss_step"):
                    loss_x.append(int(row["step"]))
                    loss_y.append(float(row["train/loss_step"]))
                if row.get(f"val/{monitor}"):
                    val_x.append(int(row["step"]))
                    val_y.append(float(row[f"val/{monitor}"]) * 100)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(loss_x, loss_y, color="tab:blue", alpha=0.3, linewidth=0.8)
    if loss_y:
        window = max(len(loss_y) // 20, 1)
        smooth = np.convolve(loss_y, np.ones(window) / window, mode="valid")
        ax.plot(loss_x[window - 1 :], smooth, color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    label = {"miou": "mIoU", "mask_ap": "mask AP", "box_ap": "box AP", "pq": "PQ"}.get(monitor, monitor)
    ax2.plot(val_x, val_y, color="tab:red", marker="o", label=f"val {label}")
    ax2.set_ylabel(f"val {label} (%)")
    fig.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _train_set(train_ds, data_cfg: dict, *, with_segments: bool) -> TrainingSet:
    transform = train_transform(
        scale_range=data_cfg.get("scale_range"),
        crop_size=data_cfg.get("crop_size"),
        hflip=data_cfg.get("hflip", True),
        color_jitter=data_cfg.get("color_jitter", 0.0),
    )
    return TrainingSet(train_ds, transform, with_segments=with_segments, cache=bool(data_cfg.get("cache", False)))


def _loaders(train_set: TrainingSet, data_cfg: dict, seed: int = 0) -> tuple[DataLoader, DataLoader | None]:
    workers = int(data_cfg.get("num_workers", 0))
    sampler = None
    threshold = data_cfg.get("repeat_factor_threshold")
    if threshold is not None:
        weights = repeat_factors(train_set, len(train_set.categories), float(threshold))
        generator = torch.Generator().manual_seed(seed)
        sampler = WeightedRandomSampler(weights.tolist(), num_samples=len(train_set), replacement=True, generator=generator)
    val_set = EvaluationSet(open_dataset(data_cfg["val"])) if data_cfg.get("val") else None
    if val_set is not None and val_set.categories.ids != train_set.categories.ids:
        raise ValueError(f"validation categories {val_set.categories.ids} differ from training {train_set.categories.ids}")
    train_loader = DataLoader(
        train_set, batch_size=int(data_cfg.get("batch_size", 8)), shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, collate_fn=collate,
    )  # fmt: skip
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, batch_size=int(data_cfg.get("val_batch_size", 4)), num_workers=0, collate_fn=collate)
    return train_loader, val_loader


def _reference_size(val_loader: DataLoader | None) -> tuple[int, int] | None:
    """The size of the validation images (the first one's): what the recorded test-time scales are
    relative to, and what inference resizes much larger photos towards."""
    if val_loader is None or not len(val_loader.dataset):
        return None
    image = val_loader.dataset[0][0]
    return int(image.shape[-2]), int(image.shape[-1])


def _seconds(value: str | float | None) -> float | None:
    """``"DD:HH:MM:SS"`` (Lightning's ``max_time`` form), ``"HH:MM:SS"`` or seconds -> seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    fields = [float(f) for f in str(value).split(":")]
    if not 1 <= len(fields) <= 4:
        raise ValueError(f"train.schedule_time {value!r}: expected DD:HH:MM:SS, HH:MM:SS or seconds")
    fields = [0.0] * (4 - len(fields)) + fields
    days, hours, minutes, secs = fields
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


def _validation_tta(train_cfg: dict) -> TestTimeAugmentation:
    scales = train_cfg.get("val_scales") or [train_cfg.get("val_scale", 1.0)]
    return TestTimeAugmentation(flip=bool(train_cfg.get("val_flip", False)), scales=tuple(scales))


def model_config_for(model_cfg: Mapping[str, Any], categories: CategoryTable) -> tuple[dict, bool]:
    """A config's ``model`` section as its builder takes it: the training set's ``categories`` (or
    their count) filled in unless the config gives them, and ``class_weights: auto`` set to None
    for a first build -- the weights come from the training labels, which the caller reads with
    what that model needs. Returns the section and whether the weights are ``auto``."""
    model_cfg = dict(model_cfg)
    if "categories" in model_arguments(model_cfg["name"]):
        if "categories" not in model_cfg and "num_classes" not in model_cfg:
            model_cfg["categories"] = categories.to_dicts()
    else:
        model_cfg.setdefault("num_classes", len(categories))
    auto_weights = model_cfg.get("class_weights") == "auto"
    if auto_weights:
        model_cfg["class_weights"] = None
    return model_cfg, auto_weights


def build_training(config: dict) -> tuple[L.Trainer, SegmentationTask, DataLoader, DataLoader | None, Path]:
    data_cfg = config.get("data", {})
    train_cfg = config.get("train", {})
    model_cfg = dict(config["model"])
    out_dir = Path(train_cfg.get("out_dir", "runs/train"))
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(train_cfg.get("seed", 0)), workers=True, verbose=False)

    train_ds = open_dataset(data_cfg["train"])
    categories = train_ds.categories
    model_cfg, auto_weights = model_config_for(model_cfg, categories)
    model = build_model(model_cfg)
    # models that learn from the semantic map alone say so; the rest get every segment's mask
    with_segments = any(f in SEGMENT_FIELDS for f in getattr(model, "target_fields", SEGMENT_FIELDS))
    train_set = _train_set(train_ds, data_cfg, with_segments=with_segments)
    if auto_weights:
        model_cfg["class_weights"] = class_weights_from_labels(train_set, len(categories))
        model = build_model(model_cfg)
    attach_categories(model, categories)
    # the checkpoint records every builder argument, and carries all weights itself
    model_cfg = {k: v for k, v in getattr(model, "config", model_cfg).items() if k != "pretrained_backbone"}
    train_loader, val_loader = _loaders(train_set, data_cfg, seed=int(train_cfg.get("seed", 0)))

    epochs = int(train_cfg.get("epochs", 10))
    devices = int(train_cfg.get("devices", 1))
    steps_per_epoch = max(len(train_loader) // devices, 1)
    max_steps = int(train_cfg.get("max_steps", -1))
    total_steps = epochs * steps_per_epoch if max_steps <= 0 else min(epochs * steps_per_epoch, max_steps)
    module = SegmentationTask(
        model,
        task=train_cfg.get("task"),
        categories=categories,
        lr=float(train_cfg.get("lr", 1e-3)),
        weight_decay=float(train_cfg.get("weight_decay", 1e-4)),
        backbone_lr_mult=float(train_cfg.get("backbone_lr_mult", 1.0)),
        warmup_steps=int(train_cfg.get("warmup_steps", 0)),
        total_steps=total_steps,
        poly_power=float(train_cfg.get("poly_power", 0.9)),
        tta=_validation_tta(train_cfg),
        schedule_seconds=_seconds(train_cfg.get("schedule_time")),
        stop_step=max_steps,
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
        max_steps=-1,  # the module stops at train.max_steps, after which Lightning validates
        max_time=train_cfg.get("max_time"),  # "DD:HH:MM:SS": a hard wall-clock budget
        accelerator=train_cfg.get("accelerator", "auto"),
        devices=devices,
        num_nodes=int(train_cfg.get("num_nodes", 1)),
        strategy=train_cfg.get("strategy", "auto"),
        precision=train_cfg.get("precision", "32-true"),
        logger=loggers,
        callbacks=[CheckpointAndCurves(out_dir, model_cfg, categories, recipe, _reference_size(val_loader))],
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
