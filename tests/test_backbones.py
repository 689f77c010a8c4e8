"""Backbones: feature strides at every output stride, weight loading, and exact rewrites of conv layers."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models.backbones import PretrainedWeightsUnavailable, build_backbone
from omniseg.models.backbones.efficientnet_lite import convert_reference_state_dict, shipped_weights_path
from omniseg.models.layers import AtrousDepthwiseConv2d, ConvBNAct
from omniseg.optimize import optimize_for_inference


def expected_sizes(height: int, width: int, output_stride: int) -> list[tuple[int, int]]:
    """Every stride-2 layer maps n to ceil(n / 2) (TF "SAME" and torchvision padding alike)."""
    return [
        (math.ceil(height / min(s, output_stride)), math.ceil(width / min(s, output_stride)))
        for s in (4, 8, 16, 32)
    ]


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0", "timm:resnet18"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_resolutions(name: str, output_stride: int) -> None:
    backbone = build_backbone(name, output_stride=output_stride).eval()
    assert backbone.strides == [4, 8, 16, 32]
    assert backbone.output_stride == output_stride
    x = torch.randn(1, 3, 67, 93)  # odd sizes on purpose
    with torch.no_grad():
        features = backbone(x)
    assert len(features) == 4
    assert [f.shape[1] for f in features] == backbone.channels
    assert [tuple(f.shape[-2:]) for f in features] == expected_sizes(67, 93, output_stride)


def test_resnet101_channels() -> None:
    backbone = build_backbone("resnet101", output_stride=16)
    assert backbone.channels == [256, 512, 1024, 2048]
    assert len(backbone.layer3) == 23  # really the 101-layer variant


def test_timm_backbone_by_name() -> None:
    backbone = build_backbone("timm:mobilenetv3_large_100", output_stride=16).eval()
    assert backbone.channels == [24, 40, 112, 960]
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (4, 6)]


def test_timm_backbone_loads_local_file(tmp_path) -> None:
    import timm

    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("timm:resnet18", pretrained=str(path))
    assert torch.equal(backbone.body.conv1.weight, source.conv1.weight)
    assert torch.equal(backbone.body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_resnet_loads_torchvision_state_dict(tmp_path) -> None:
    from torchvision.models import resnet50

    torch.manual_seed(0)
    reference = resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)  # includes fc.*, which a backbone drops
    backbone = build_backbone("resnet50", pretrained=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.layer4(
            reference.layer3(reference.layer2(reference.layer1(
                reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
            )))
        )
        assert torch.equal(backbone(x)[3], expected)


def test_offline_errors_are_clear(tmp_path) -> None:
    with pytest.raises(PretrainedWeightsUnavailable, match="offline"):
        build_backbone("resnet50", pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailable, match="offline"):
        build_backbone("timm:resnet18", pretrained=True)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone("resnet50", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(KeyError, match="unknown backbone"):
        build_backbone("resnet7")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("efficientnet_lite0", output_stride=4)


# ----------------------------------------------------------------------------- EfficientNet-Lite0
def _reference_lite0(image_size: int | None):
    """The ``efficientnet-lite-pytorch`` model with the shipped weights (test-only dependency)."""
    pytest.importorskip(
        "efficientnet_lite_pytorch", reason="efficientnet-lite-pytorch (dev extra) is the conversion referee"
    )
    from efficientnet_lite_pytorch import EfficientNet

    # the package prints while loading; weights_path keeps it offline
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=shipped_weights_path(), image_size=image_size
        )
    return model.eval()


def _reference_features(model, x: torch.Tensor) -> list[torch.Tensor]:
    x = model._swish(model._bn0(model._conv_stem(x)))
    features = []
    for index, block in enumerate(model._blocks):
        x = block(x)
        if index in (2, 4, 10, 15):  # last block at strides 4, 8, 16, 32
            features.append(x)
    return features


@pytest.mark.parametrize(
    ("image_size", "height", "width"),
    [(224, 224, 224), (None, 129, 161), (None, 96, 130)],  # static 224 padding, then TF "SAME" at any size
)
def test_efficientnet_lite0_matches_reference(image_size: int | None, height: int, width: int) -> None:
    reference = _reference_lite0(image_size)
    ours = build_backbone("efficientnet_lite0", pretrained=True).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, height, width)
    with torch.no_grad():
        expected = _reference_features(reference, x)
        exact = ours(x)  # as built: the conversion itself must be exact
        folded = optimize_for_inference(ours)(x)  # BN folded: equal up to float rounding
    for e, a, f in zip(expected, exact, folded, strict=True):
        assert e.shape == a.shape
        assert (e - a).abs().max().item() <= 1e-5
        assert (e - f).abs().max().item() <= 1e-5 * max(1.0, e.abs().max().item())


def test_efficientnet_lite0_converter_drops_head() -> None:
    state = torch.load(shipped_weights_path(), map_location="cpu", weights_only=True)
    converted = convert_reference_state_dict(state)
    assert not any(k.startswith(("_fc", "_conv_head", "_bn1.")) for k in converted)
    assert torch.equal(converted["stem.0.weight"], state["_conv_stem.weight"])
    assert torch.equal(converted["blocks.15.project.1.running_var"], state["_blocks.15._bn2.running_var"])


def test_efficientnet_lite0_bn_matches_tf_training() -> None:
    backbone = build_backbone("efficientnet_lite0")
    bn = backbone.stem[1]
    assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.01)


# ----------------------------------------------------------------------------- exact conv rewrites
@pytest.mark.parametrize(
    ("channels", "kernel", "dilation", "size"),
    [(8, 5, 2, (23, 30)), (6, 3, 6, (23, 30)), (6, 3, 12, (23, 30)), (6, 3, 18, (23, 30)), (4, 3, 4, (45, 61))],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_atrous_depthwise_equals_dilated_conv(channels, kernel, dilation, size, channels_last) -> None:
    torch.manual_seed(0)
    conv = AtrousDepthwiseConv2d(channels, kernel, dilation)
    x = torch.randn(2, channels, *size, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    expected = F.conv2d(x, conv.weight, None, 1, conv.padding, conv.dilation, channels)
    actual = conv(x)  # grad enabled: the training strategy
    assert torch.allclose(actual, expected, atol=1e-5)
    grad = torch.randn_like(expected)
    g_expected = torch.autograd.grad(expected, (x, conv.weight), grad)
    g_actual = torch.autograd.grad(actual, (x, conv.weight), grad)
    for e, a in zip(g_expected, g_actual, strict=True):
        assert torch.allclose(a, e, atol=1e-4)
    if channels_last:  # gradients keep the layout (BN backward is ~10x slower on mixed layouts)
        assert g_actual[0].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the inference strategy
        assert torch.allclose(conv(x), expected, atol=1e-5)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_conv_bn_act_inference_paths(act) -> None:
    torch.manual_seed(0)
    block = ConvBNAct(nn.Conv2d(5, 7, 3, padding=1, bias=False), nn.BatchNorm2d(7), act(inplace=True))
    with torch.no_grad():
        block[1].running_mean.uniform_(-1, 1)
        block[1].running_var.uniform_(0.5, 2)
        block[1].weight.uniform_(0.5, 2)
        block[1].bias.uniform_(-1, 1)
    optimize_for_inference(block)  # eval mode, BN folded, conv + activation fused
    assert block.folding and block.fused_conv
    x = torch.randn(2, 5, 11, 13) * 3
    expected = act()(block[1](block[0](x)))
    assert torch.allclose(block(x), expected, atol=1e-5)  # folded, differentiable
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)  # folded + fused, cached
        block[1].running_mean.add_(0.5)  # a changed statistic invalidates the cached fold
        assert torch.allclose(block(x), act()(block[1](block[0](x))), atol=1e-5)
