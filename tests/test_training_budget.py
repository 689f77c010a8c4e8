"""Budgeted training on small machines: a time-based schedule that ends (and validates) inside the
budget, detectors that keep the data pipeline's scale, a frozen stem, a narrower mask head."""

import csv
import json

import pytest
import torch

from omniseg.engine.train import _seconds, train
from omniseg.models import build_model
from omniseg.models.layers.detection import preprocess
from test_engine import _config
from test_mask_rcnn import _tiny_model


def test_schedule_time_parses_lightning_and_clock_forms():
    assert _seconds("00:01:15:00") == 4500.0
    assert _seconds("01:15:00") == 4500.0
    assert _seconds("1:00:00:30") == 86430.0
    assert _seconds(90) == 90.0 and _seconds(None) is None
    with pytest.raises(ValueError, match="schedule_time"):
        _seconds("1:2:3:4:5")


class _FakeClock:
    """Each reading advances 0.25 s: every training step then lasts exactly 0.25 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 0.25
        return self.now


def test_schedule_time_decays_then_stops_and_validates(tmp_path, monkeypatch):
    import omniseg.engine.module

    monkeypatch.setattr(omniseg.engine.module, "time", _FakeClock())
    budget = 2.0  # eight steps of 0.25 s
    out = train(_config(tmp_path, epochs=500, schedule_time=budget, warmup_steps=0, log_every=1))
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("lr")]
    seconds = [float(r["train/seconds"]) for r in rows if r.get("train/seconds")]
    lrs = [float(r["lr"]) for r in steps]
    # stopped on the budget, long before 500 epochs (2 steps each): eight steps, mid-epoch
    assert len(steps) == 8 and seconds == pytest.approx([0.25 * (i + 1) for i in range(8)])
    # the poly decay follows training time: non-increasing, and nearly spent at the end
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:], strict=False))
    # (Lightning steps the scheduler before the batch-end hook that counts the step's time: one step late)
    assert lrs == pytest.approx([1e-3 * (1 - 0.125 * max(i - 1, 0)) ** 0.9 for i in range(8)], rel=1e-5)
    # Lightning validated at the stop, and that validation is what best.json holds
    logged = [float(r["val/miou"]) for r in rows if r.get("val/miou")]
    assert logged, "no validation at the end of a time-budgeted run"
    meta = json.loads((out / "best.json").read_text())
    assert meta["val"]["miou"] == pytest.approx(max(logged), abs=1e-6)


def test_min_size_none_keeps_the_input_size():
    image = torch.rand(3, 70, 130)
    target = {"boxes": torch.tensor([[3.0, 4.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
              "masks": torch.zeros(1, 70, 130, dtype=torch.bool)}  # fmt: skip
    target["masks"][0, 4:60, 3:50] = True
    batch, targets, sizes = preprocess([image], [target], min_size=None, max_size=1333, training=True, need_masks=True)
    assert batch.image_sizes == [(70, 130)] and sizes == [(70, 130)]
    assert batch.tensors.shape[-2:] == (96, 160)  # padded to a multiple of 32, not resized
    torch.testing.assert_close(batch.tensors[0, :, :70, :130], image)
    torch.testing.assert_close(targets[0]["boxes"], target["boxes"])
    # and the model evaluates at the input's own size: boxes stay inside the 70x130 frame
    model = _tiny_model(min_size=None).eval()
    with torch.no_grad():
        detections = model([image])
    assert detections[0]["boxes"].shape[1] == 4
    if len(detections[0]["boxes"]):
        assert detections[0]["boxes"][:, 2].max() <= 130 and detections[0]["boxes"][:, 3].max() <= 70


def test_freeze_stem_and_mask_head_channels_reach_the_model():
    model = _tiny_model(freeze_stem=True, mask_head_channels=32, min_size=None)
    stem = [p for m in model.backbone.stem_modules() for p in m.parameters()]
    assert stem and not any(p.requires_grad for p in stem)
    assert model.roi_heads.mask_head[0][0].out_channels == 32
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    assert not any(p.requires_grad for m in rebuilt.backbone.stem_modules() for p in m.parameters())
    # the rest of the backbone still learns
    model.train()
    image = torch.rand(3, 96, 128)
    masks = torch.zeros(1, 96, 128, dtype=torch.bool)
    masks[0, 20:70, 30:90] = True
    target = {"boxes": torch.tensor([[30.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = model.losses([image], [target])
    sum(losses.values()).backward()
    last_block = list(model.backbone.blocks[-1].parameters())
    assert all(p.grad is None for p in stem)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in last_block)


class _SemanticFrames:
    """A training set of hand-made semantic maps (what repeat_factors reads of each frame)."""

    def __init__(self, maps: list[list[int]]) -> None:
        self.maps = [torch.tensor(m, dtype=torch.uint8).reshape(1, -1) for m in maps]
        self.categories = list(range(3))

    def __len__(self) -> int:
        return len(self.maps)

    def raw(self, index: int):
        return None, {"semantic": self.maps[index]}


def test_repeat_factors_follow_the_lvis_formula():
    from omniseg.engine.train import repeat_factors

    # class 0 in every frame (f=1), class 1 in one of four (f=1/4), class 2 in one, 255 is void
    frames = _SemanticFrames([[0, 0], [0, 1], [0, 255], [2, 255]])
    # threshold 1: r_1 = r_2 = sqrt(1 / 0.25) = 2, r_0 = max(1, sqrt(1 / 0.75)) = 1.1547
    factors = repeat_factors(frames, 3, threshold=1.0)
    assert factors.tolist() == pytest.approx([(1 / 0.75) ** 0.5, 2.0, (1 / 0.75) ** 0.5, 2.0])
    # a threshold below every frequency leaves uniform sampling
    assert repeat_factors(frames, 3, threshold=0.2).tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="repeat_factor_threshold"):
        repeat_factors(frames, 3, threshold=0.0)


def test_repeat_factor_sampling_draws_rare_frames_more_often():
    from omniseg.engine.train import _loaders

    frames = _SemanticFrames([[0, 0]] * 6 + [[0, 1]] * 2)  # class 1 in a quarter of the frames
    loader, _ = _loaders(frames, {"batch_size": 1, "repeat_factor_threshold": 4.0}, seed=0)
    # r_1 = sqrt(4 / 0.25) = 4, r_0 = 2: the two rare frames weigh 8 of 20, i.e. 40% of draws
    draws = [i for _ in range(500) for i in loader.sampler]
    rare_share = sum(i >= 6 for i in draws) / len(draws)
    assert abs(rare_share - 0.4) < 0.03
    assert loader.sampler.replacement and len(loader.sampler) == len(frames)
