"""A detector really learns: Mask R-CNN fits one real coco128 image to COCO mask AP >= 0.9, trained
through the same typed targets, inference path and metric as ``omniseg train`` / ``evaluate``."""

from __future__ import annotations

import pytest
import torch

from omniseg.data import open_dataset
from omniseg.engine.data import EvaluationSet, TrainingSet
from omniseg.inference import predict_segments
from omniseg.metrics.task_metrics import metric_for_task
from omniseg.models import build_model


@pytest.mark.slow
def test_mask_rcnn_overfits_one_real_image_to_mask_ap_09(shared_data):
    root = shared_data / "coco128_seg"
    if not root.is_dir():
        pytest.skip(f"{root} is absent (the shared coco128_seg sample)")
    torch.manual_seed(0)
    dataset = open_dataset({"format": "yolo", "root": str(root), "subset": "2:3"})  # a potted plant and a vase
    image, target = TrainingSet(dataset)[0]
    model = build_model({
        "name": "mask_rcnn", "categories": dataset.categories.to_dicts(), "backbone": "efficientnet_lite0",
        "pretrained_backbone": True, "min_size": 320, "max_size": 640, "fpn_channels": 64,
        "rpn_post_nms_top_n_train": 300, "box_batch_size_per_image": 64,
    })  # fmt: skip
    steps = 160
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + torch.cos(torch.tensor(step / steps * torch.pi))).item())
    model.train()
    for _ in range(steps):
        loss = sum(model([image], [target]).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    metric = metric_for_task("instance", dataset.categories)
    eval_image, gt, image_id = EvaluationSet(dataset)[0]
    metric.update(image_id, gt, predict_segments(model, eval_image[None], task="instance")[0])
    result = metric.compute()
    assert result["segm"]["AP"] >= 0.9, result
    assert result["bbox"]["AP"] >= 0.8, result
