"""DeepLabV3 / V3+: torchvision fidelity, any input size, the training contract and the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omniseg.models import build_model, list_models
from omniseg.models.deeplab import (
    DeepLabV3Plus,
    load_torchvision_deeplabv3,
    semantic_cross_entropy,
)
from omniseg.optimize import optimize_for_inference


def _perturb_batch_norm(model: torch.nn.Module) -> None:
    """Non-trivial BN statistics and affines, so that a wrong eps/order/mapping shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def test_deeplabv3_resnet50_matches_torchvision() -> None:
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    reference = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    _perturb_batch_norm(reference)
    reference.eval()
    # torchvision's deeplabv3_resnet50 is output stride 8 with rates 12/24/36
    ours = build_model({"name": "deeplabv3", "num_classes": 21, "output_stride": 8, "aux": True}).eval()
    load_torchvision_deeplabv3(ours, reference.state_dict())
    x = torch.randn(1, 3, 129, 161)
    with torch.no_grad():
        expected = reference(x)["out"]
        actual = ours(x)
    assert actual.shape == expected.shape == (1, 21, 129, 161)
    assert (actual - expected).abs().max().item() <= 1e-4
    # post_process: the per-pixel argmax as category ids (here the class indices), scored by confidence
    (segments,) = ours.post_process(actual, [(129, 161)])
    label = actual.argmax(1)[0].numpy()
    assert np.array_equal(segments.to_semantic(), label)
    # and torchvision's labels wherever its top two logits are further apart than the 1e-4 allowed
    # above (closer ones may swap with the thread count's summation order)
    top2 = expected.topk(2, dim=1).values[0]
    clear = ((top2[0] - top2[1]) > 2e-4).numpy()
    assert clear.mean() > 0.99
    assert np.array_equal(label[clear], expected.argmax(1)[0].numpy()[clear])
    confidence = actual.softmax(1).max(1).values[0].numpy()
    for cat, score in zip(segments.category_ids, segments.scores, strict=True):
        assert score == pytest.approx(confidence[label == cat].mean(), rel=1e-5)


def test_torchvision_import_without_aux_head() -> None:
    from torchvision.models.segmentation import deeplabv3_resnet50

    reference = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    ours = build_model({"name": "deeplabv3", "num_classes": 3, "output_stride": 8})
    load_torchvision_deeplabv3(ours, reference.state_dict())  # aux_classifier.* dropped
    wrong = build_model({"name": "deeplabv3", "num_classes": 4, "output_stride": 8})
    with pytest.raises(RuntimeError):
        load_torchvision_deeplabv3(wrong, reference.state_dict())


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(97, 131), (64, 64), (33, 250)])
def test_deeplabv3plus_any_input_size(output_stride: int, size: tuple[int, int]) -> None:
    model = build_model({"name": "deeplabv3plus", "num_classes": 5, "output_stride": output_stride}).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 5, *size)
    assert logits.is_contiguous()
    segments = model.post_process(logits, [size, size])
    assert [s.image_size for s in segments] == [size, size]
    assert np.array_equal(segments[1].to_semantic(), logits[1].argmax(0).numpy())


@pytest.mark.parametrize("size", [(75, 101), (200, 250)])  # small / large maps pick different dilated-conv paths
def test_inference_optimisations_do_not_change_outputs(size: tuple[int, int]) -> None:
    """optimize_for_inference (BN folding + fused kernels) on top of channels-last and the conv
    rewrites equals the plain eval computation."""
    torch.manual_seed(0)
    model = build_model({"name": "deeplabv3plus", "num_classes": 4, "aux": True})
    _perturb_batch_norm(model)
    model.eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        plain = model(x)
        fast = optimize_for_inference(model)(x)
    with_grad = model(x)  # autograd on: differentiable paths (BN folded differentiably)
    scale = plain.abs().max().item()
    assert (fast - plain).abs().max().item() <= 1e-4 * max(1.0, scale)
    assert (with_grad - plain).abs().max().item() <= 1e-4 * max(1.0, scale)


@pytest.mark.parametrize(
    "config",
    [
        {"name": "deeplabv3plus", "num_classes": 4, "aux": True},
        {"name": "deeplabv3plus", "num_classes": 4, "separable": False, "output_stride": 8},
        {"name": "deeplabv3", "backbone": "timm:resnet18", "num_classes": 4, "aux": True},
    ],
)
def test_training_forward_returns_finite_losses_and_gradients(config: dict) -> None:
    torch.manual_seed(0)
    model = build_model(config).train()
    images = torch.randn(2, 3, 70, 90)
    target = torch.randint(0, 4, (2, 70, 90))
    target[:, :5] = 255
    losses = model(images, {"semantic": target})
    assert set(losses) == ({"loss_ce", "loss_aux"} if config.get("aux") else {"loss_ce"})
    total = sum(losses.values())
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    total.backward()
    first_conv = next(p for n, p in model.backbone.named_parameters() if p.ndim == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_all_ignore_target_gives_zero_loss_without_nan() -> None:
    model = build_model({"name": "deeplabv3plus", "num_classes": 3, "aux": True}).train()
    images = torch.randn(2, 3, 40, 50)
    target = torch.full((2, 40, 50), 255, dtype=torch.long)
    losses = model(images, {"semantic": target})
    total = sum(losses.values())
    assert total.item() == 0.0
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_ignore_index_from_model_attribute() -> None:
    model = build_model({"name": "deeplabv3plus", "num_classes": 3, "ignore_index": 7})
    assert model.ignore_index == 7
    logits = torch.randn(2, 3, 8, 9)
    target = torch.randint(0, 3, (2, 8, 9))
    target[0, :4] = 7
    expected = F.cross_entropy(logits, target, ignore_index=7)
    assert torch.allclose(model.loss(logits, target), expected, atol=1e-6)


def test_loss_matches_pytorch_with_weights_and_smoothing() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10, 12)
    target = torch.randint(0, 4, (2, 10, 12))
    target[1, 3:6] = 255
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0])
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=255, label_smoothing=0.1)
    actual = semantic_cross_entropy(logits, target, class_weights=weights, label_smoothing=0.1)
    assert torch.allclose(actual, expected, atol=1e-6)


def test_ohem_keeps_hard_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 20, 20) * 4
    target = torch.randint(0, 3, (1, 20, 20))
    plain = semantic_cross_entropy(logits, target)
    # threshold 1.0 keeps every pixel: plain CE
    assert torch.allclose(semantic_cross_entropy(logits, target, ohem_thresh=1.0, ohem_min_kept=1), plain)
    # a low threshold keeps only the hardest pixels (at least min_kept): a larger mean loss
    hard = semantic_cross_entropy(logits, target, ohem_thresh=0.05, ohem_min_kept=50)
    assert hard > plain
    pixel = F.cross_entropy(logits, target, reduction="none").flatten()
    assert hard <= pixel.max() + 1e-6


def test_config_rebuilds_the_model() -> None:
    model = build_model(
        {"name": "deeplabv3plus", "num_classes": 6, "class_weights": [1, 2, 3, 4, 5, 6], "aux": True}
    )
    config = json.loads(json.dumps(model.config))  # JSON-serialisable
    assert config["name"] == "deeplabv3plus" and config["backbone"] == "efficientnet_lite0"
    assert config["output_stride"] == 16 and config["class_weights"] == [1, 2, 3, 4, 5, 6]
    rebuilt = build_model(config)
    assert isinstance(rebuilt, DeepLabV3Plus)
    rebuilt.load_state_dict(model.state_dict())  # same architecture, same keys
    assert torch.equal(rebuilt.class_weights, model.class_weights)
    assert {"deeplabv3", "deeplabv3plus"} <= set(list_models())
    with pytest.raises(KeyError, match="unknown model"):
        build_model({"name": "no-such-model"})


def test_decoder_and_aspp_widths_are_separate() -> None:
    model = build_model(
        {"name": "deeplabv3plus", "num_classes": 4, "aspp_channels": 64, "decoder_channels": 32, "low_level_channels": 8}
    ).eval()
    assert model.aspp.project[0].out_channels == 64
    first_pointwise = model.decoder[0][1][0]
    assert (first_pointwise.in_channels, first_pointwise.out_channels) == (64 + 8, 32)
    assert model.classifier.in_channels == 32
    with torch.no_grad():
        assert model(torch.randn(1, 3, 70, 90)).shape == (1, 4, 70, 90)
    default = build_model({"name": "deeplabv3plus", "num_classes": 4, "decoder_channels": 32})
    assert default.aspp.project[0].out_channels == 32  # the paper's layout: one width for both
    rebuilt = build_model(json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(model.state_dict())
