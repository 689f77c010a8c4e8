"""torchvision reference detectors for the fidelity tests and the latency benchmark.

Nothing is downloaded: the torchvision models are randomly initialised (seeded) and then made to
behave like trained ones, so that comparing two implementations means something:

1. batch-norm statistics are measured on a few structured images and frozen, as torchvision does
   for a pretrained backbone (``FrozenBatchNorm2d``);
2. the last batch norm of every residual block is scaled down (``residual_scale``). A random
   ResNet-50 whose 16 residual branches are as large as its identity paths amplifies float32
   rounding about 100x (its C5 differs from a float64 evaluation by ~6e-5 relative), so two
   implementations that only sum in a different order disagree by 1e-2 px on boxes. Trained
   ResNets keep residual branches small (and zero-init-residual starts them at zero); scaled by
   0.25 the network's own float32 error drops to ~1e-6, as for trained weights;
3. classifier biases are spread so that confident detections exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def structured_images(n: int, height: int, width: int, *, seed: int = 0) -> Tensor:
    """``(n, 3, H, W)`` images in [0, 1]: smooth colour fields, a few rectangles, light texture."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(
        torch.rand(n, 3, max(height // 32, 2), max(width // 32, 2), generator=g),
        size=(height, width),
        mode="bicubic",
        align_corners=False,
    )
    mid = F.interpolate(
        torch.rand(n, 3, max(height // 8, 2), max(width // 8, 2), generator=g),
        size=(height, width),
        mode="bilinear",
        align_corners=False,
    )
    images = 0.6 * low + 0.3 * mid + 0.1 * torch.rand(n, 3, height, width, generator=g)
    for i in range(n):
        for _ in range(6):
            y0 = int(torch.randint(0, height - 8, (1,), generator=g))
            x0 = int(torch.randint(0, width - 8, (1,), generator=g))
            y1 = y0 + int(torch.randint(8, max(height // 2, 9), (1,), generator=g))
            x1 = x0 + int(torch.randint(8, max(width // 2, 9), (1,), generator=g))
            images[i, :, y0:y1, x0:x1] = torch.rand(3, 1, 1, generator=g)
    return images.clamp(0, 1)


def normalise(images: Tensor) -> Tensor:
    """What omniseg models take: ImageNet-normalised images (torchvision normalises inside)."""
    return (images - IMAGENET_MEAN) / IMAGENET_STD


def _freeze(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze(child)


@torch.no_grad()
def make_trained_like(
    model: nn.Module,
    calibration_images: Tensor,
    *,
    residual_scale: float = 0.25,
    class_bias_std: float = 2.0,
    seed: int = 0,
) -> nn.Module:
    """In place, for a torchvision ``maskrcnn_resnet50_fpn`` or ``retinanet_resnet50_fpn``."""
    body = model.backbone.body
    for m in body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
    body.train()
    batch, _ = model.transform(list(calibration_images))
    body(batch.tensors)
    _freeze(body)
    for name, m in body.named_modules():
        if name.endswith("bn3"):
            m.weight.mul_(residual_scale)
    g = torch.Generator().manual_seed(seed)
    if hasattr(model, "roi_heads"):
        bias = model.roi_heads.box_predictor.cls_score.bias
    else:
        bias = model.head.classification_head.cls_logits.bias
    bias.add_(torch.randn(bias.shape, generator=g) * class_bias_std)
    if hasattr(model, "roi_heads"):
        # with few classes the background could win everywhere: keep some class above it
        bias[0] = torch.minimum(bias[0], bias[1:].max() - 1.0)
    else:
        # RetinaNet's channel 0 is the background of torchvision's 91 COCO labels: never trained
        # positive, so it never fires in a trained model (omniseg never reports it)
        bias.view(-1, 91)[:, 0] = -10.0
    return model.eval()


def match_detections(
    reference: dict[str, Tensor],
    ours: dict[str, Tensor],
    *,
    score_margin: float = 1e-4,
    score_thresh: float = 0.0,
) -> dict[str, float]:
    """Pair each reference detection with ours (same label, nearest box; score order may swap
    between near-ties) and report the worst differences.

    Reference detections whose score is within ``score_margin`` of the lowest kept score or of
    ``score_thresh`` are not required to have a partner: a rounding difference may legitimately
    move them across the cut.
    """
    ref_boxes, ref_labels, ref_scores = reference["boxes"], reference["labels"], reference["scores"]
    boxes, labels, scores = ours["boxes"], ours["labels"], ours["scores"]
    lowest = float(ref_scores.min()) if len(ref_scores) else 0.0
    used = torch.zeros(len(boxes), dtype=torch.bool)
    worst_box = worst_score = 0.0
    min_iou = 1.0
    unmatched = 0
    for i in range(len(ref_boxes)):
        candidates = torch.where((labels == ref_labels[i]) & ~used)[0]
        required = float(ref_scores[i]) > max(lowest, score_thresh) + score_margin
        if len(candidates) == 0:
            unmatched += int(required)
            continue
        diffs = (boxes[candidates] - ref_boxes[i]).abs().amax(1)
        j = int(candidates[diffs.argmin()])
        if float(diffs.min()) > 1.0:  # not the same detection
            unmatched += int(required)
            continue
        used[j] = True
        worst_box = max(worst_box, float(diffs.min()))
        worst_score = max(worst_score, abs(float(scores[j] - ref_scores[i])))
        if "masks" in reference:
            a, b = reference["masks"][i, 0] > 0.5, ours["masks"][j, 0] > 0.5
            union = int((a | b).sum())
            min_iou = min(min_iou, int((a & b).sum()) / union if union else 1.0)
    return {
        "matched": int(used.sum()),
        "unmatched": unmatched,
        "max_box_diff": worst_box,
        "max_score_diff": worst_score,
        "min_mask_iou": min_iou,
    }
