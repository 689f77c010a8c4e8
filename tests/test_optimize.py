"""optimize_for_inference: one switch for the fast paths, same outputs as the plain model, and a
tested fallback to the plain path for every private PyTorch / torchvision API the fast paths use."""

from __future__ import annotations

import contextlib
import copy
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import omniseg
import omniseg.models.layers.roi_align as roi_align_module
from conftest import shared_data
from omniseg.models import build_model
from omniseg.models.layers.conv import FUSED_CONV, ConvBNAct
from omniseg.models.layers.fast_inference import (
    MKLDNN_REORDER,
    NNPACK_CONV,
    FastConv2d,
    InferenceCopy,
    MkldnnConv2d,
    MkldnnLayout,
    MkldnnWinogradConv2d,
)
from omniseg.models.layers.private_ops import PRIVATE_OPS, VERSION_COUNTER, reset_private_ops
from omniseg.models.layers.roi_align import ROI_HELPERS, ParallelMultiScaleRoIAlign
from omniseg.optimize import INFERENCE_OPTIONS, optimize_for_inference
from tv_reference import IMAGENET_MEAN, IMAGENET_STD, match_detections

ALL_OFF = dict.fromkeys(INFERENCE_OPTIONS, False)


@pytest.fixture(autouse=True)
def _fresh_probes():
    """Every test sees freshly probed private ops, and leaves none disabled behind it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the threaded RoIAlign needs two
    reset_private_ops()
    yield
    reset_private_ops()
    torch.set_num_threads(threads)


def _image(path, size: tuple[int, int]) -> torch.Tensor:
    """A real photo, resized to ``size``, ImageNet-normalised ``(3, H, W)``."""
    rgb = np.array(Image.open(path).convert("RGB"))
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - IMAGENET_MEAN) / IMAGENET_STD


# ----------------------------------------------------------------------------------- DeepLabV3+
@pytest.fixture(scope="module")
def camvid_image() -> torch.Tensor:
    path = sorted((shared_data("camvid") / "val").glob("*.png"))[0]
    return _image(path, (180, 240))[None]


def _deeplab() -> nn.Module:
    torch.manual_seed(0)
    model = build_model({"name": "deeplabv3plus", "num_classes": 11})
    with torch.no_grad():  # trained-like batch norm, so that folding it is not a no-op
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def deeplab_pair(camvid_image):
    """The plain model and its logits on a CamVid frame."""
    model = _deeplab()
    with torch.inference_mode():
        logits = model(camvid_image)
    return model, logits


def _assert_same_logits(got: torch.Tensor, expected: torch.Tensor) -> None:
    # the tolerance ConvBNAct's folding claims (float rounding), as in test_deeplab_model
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= 1e-4 * scale
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.999


def _optimized_logits(deeplab_pair, camvid_image, **options) -> torch.Tensor:
    model = optimize_for_inference(copy.deepcopy(deeplab_pair[0]), **options)
    with torch.inference_mode():
        model(camvid_image)  # the second run uses the cached folded weights
        return model(camvid_image)


def test_deeplab_optimized_equals_plain(deeplab_pair, camvid_image):
    plain, expected = deeplab_pair
    blocks = [m for m in plain.modules() if isinstance(m, ConvBNAct)]
    assert blocks and not any(b.fold_bn or b.fused_conv for b in blocks)  # as built: plain
    got = _optimized_logits(deeplab_pair, camvid_image)
    _assert_same_logits(got, expected)
    if torch.backends.mkldnn.is_available():
        assert FUSED_CONV.available()  # the fast path did run


def _raising(*args, **kwargs):
    raise RuntimeError("private op broken (test)")


@contextlib.contextmanager
def _warns_once_if_broken(how: str, op_name: str):
    """A broken op (there, but raising or wrong) warns exactly once; a missing one not at all."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    ours = [w for w in caught if op_name in str(w.message)]
    assert len(ours) == (0 if how in ("missing", "unavailable") else 1), [str(w.message) for w in ours]


def _fake_op_packet(default) -> types.SimpleNamespace:
    return types.SimpleNamespace(default=default)


@pytest.mark.parametrize("how", ["missing", "raises", "wrong", "raises_later"])
def test_fused_conv_fallback(deeplab_pair, camvid_image, monkeypatch, how):
    """torch.ops.mkldnn._convolution_pointwise gone, raising, wrong, or failing after its probe:
    BN is still folded, the convolution runs unfused, the logits are the plain model's."""
    real = torch.ops.mkldnn._convolution_pointwise.default
    if how == "missing":
        monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", object())  # no .default
    elif how == "raises":
        monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", _fake_op_packet(_raising))
    elif how == "wrong":
        monkeypatch.setattr(
            torch.ops.mkldnn, "_convolution_pointwise", _fake_op_packet(lambda *a: torch.zeros(1, 5, 7, 6))
        )
    else:  # right on the probe's input, raises on the model's

        def later(x, *args):
            if x.shape[1] == 4:
                return real(x, *args)
            raise RuntimeError("unsupported shape (test)")

        monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", _fake_op_packet(later))
    with _warns_once_if_broken(how, "_convolution_pointwise"):
        got = _optimized_logits(deeplab_pair, camvid_image)
    _assert_same_logits(got, deeplab_pair[1])
    assert FUSED_CONV.get() is None


def _break_version_counter(monkeypatch, how: str) -> None:
    """``Tensor._version`` gone (AttributeError) or broken (RuntimeError) for every tensor."""
    error = AttributeError if how == "missing" else RuntimeError

    def version(self):
        raise error("no version counter (test)")

    monkeypatch.setattr(torch.Tensor, "_version", property(version), raising=False)


@pytest.mark.parametrize("how", ["missing", "raises"])
def test_version_counter_fallback_deeplab(deeplab_pair, camvid_image, monkeypatch, how):
    """Without version counters nothing is cached: BN is folded afresh on every call."""
    model = optimize_for_inference(copy.deepcopy(deeplab_pair[0]))
    _break_version_counter(monkeypatch, how)
    with _warns_once_if_broken(how, "_version"), torch.no_grad():
        model(camvid_image)
        got = model(camvid_image)
    _assert_same_logits(got, deeplab_pair[1])
    assert VERSION_COUNTER.get() is None
    assert all(m._fold_cache is None for m in model.modules() if isinstance(m, ConvBNAct))


def test_optimized_model_trains_like_the_plain_one(deeplab_pair):
    """Training (and autograd) never take a fast path: the losses are the plain model's, exactly."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 80)
    target = {"semantic": torch.randint(0, 11, (2, 64, 80))}
    plain = copy.deepcopy(deeplab_pair[0]).train()
    fast = optimize_for_inference(copy.deepcopy(deeplab_pair[0])).train()
    losses = []
    for model in (plain, fast):
        torch.manual_seed(2)  # the same dropout masks
        losses.append(sum(model(images, target).values()))
    assert torch.equal(losses[0], losses[1])


# ---------------------------------------------------------------------------------- Mask R-CNN
def _detector(**config) -> nn.Module:
    """A small random-init Mask R-CNN (timm ResNet-18: zero-init residual branches, so float
    rounding is not amplified) with spread class biases, so that confident detections exist."""
    torch.manual_seed(0)
    model = build_model(
        {"name": "mask_rcnn", "backbone": "timm:resnet18", "num_classes": 5, "min_size": 224, "max_size": 320, **config}
    )
    with torch.no_grad():
        bias = model.roi_heads.box_predictor.cls_score.bias
        bias.add_(torch.randn(bias.shape) * 2)
        bias[0] = torch.minimum(bias[0], bias[1:].max() - 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def coco_image() -> torch.Tensor:
    path = sorted((shared_data("coco128_seg") / "images").rglob("*.jpg"))[0]
    return _image(path, (240, 320))


@pytest.fixture(scope="module")
def detector_pair(coco_image):
    """The plain Mask R-CNN and its detections on a COCO photo."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _detector()
        return model, model.detect([coco_image])[0]
    finally:
        torch.set_num_threads(threads)


def _assert_same_detections(got: dict, expected: dict) -> None:
    assert len(expected["boxes"]) >= 5
    assert len(got["boxes"]) == len(expected["boxes"])
    stats = match_detections(expected, got)  # pairs on the same label, nearest box
    assert stats["unmatched"] == 0, stats
    assert stats["max_box_diff"] <= 1e-3, stats
    assert stats["max_score_diff"] <= 1e-4, stats
    assert stats["min_mask_iou"] >= 0.99, stats


def _optimized_detections(detector_pair, image, **options) -> tuple[nn.Module, dict]:
    model = optimize_for_inference(copy.deepcopy(detector_pair[0]), **options)
    return model, model.detect([image])[0]


def test_mask_rcnn_optimized_equals_plain(detector_pair, coco_image):
    plain, expected = detector_pair
    assert plain.inference_backbone is None
    model, got = _optimized_detections(detector_pair, coco_image)
    _assert_same_detections(got, expected)
    # every fast path was taken
    backbone = model.inference_backbone.get(model.backbone)
    assert isinstance(backbone, MkldnnLayout)
    if NNPACK_CONV.available():
        assert any(isinstance(m, MkldnnWinogradConv2d) for m in backbone.modules())
    for op in (NNPACK_CONV, MKLDNN_REORDER, VERSION_COUNTER, ROI_HELPERS):
        assert op.reason is None  # probed (or never needed), none failed
    assert ROI_HELPERS.available() and VERSION_COUNTER.available()


@pytest.mark.parametrize("how", ["missing", "unavailable", "raises", "raises_later"])
def test_nnpack_fallback(detector_pair, coco_image, monkeypatch, how):
    """Without NNPACK, 3x3 convolutions run on oneDNN (the backbone copy keeps its layout)."""
    real = torch._nnpack_spatial_convolution
    if how == "missing":
        monkeypatch.delattr(torch, "_nnpack_spatial_convolution")
    elif how == "unavailable":
        monkeypatch.setattr(torch, "_nnpack_available", lambda: False)
    elif how == "raises":
        monkeypatch.setattr(torch, "_nnpack_spatial_convolution", _raising)
    else:

        def later(x, *args):
            if x.shape[-2:] == (12, 10):  # the probe's input
                return real(x, *args)
            raise RuntimeError("no kernels for this CPU (test)")

        monkeypatch.setattr(torch, "_nnpack_spatial_convolution", later)
    with _warns_once_if_broken(how, "_nnpack"):
        model, got = _optimized_detections(detector_pair, coco_image)
    _assert_same_detections(got, detector_pair[1])
    assert NNPACK_CONV.get() is None
    assert isinstance(model.inference_backbone.get(model.backbone), MkldnnLayout)


@pytest.mark.parametrize("how", ["missing", "raises"])
def test_mkldnn_reorder_fallback(detector_pair, coco_image, monkeypatch, how):
    """Without weight pre-packing the backbone copy keeps oneDNN layout with unpacked weights."""
    if how == "missing":
        monkeypatch.delattr(torch._C._nn, "mkldnn_reorder_conv2d_weight")
    else:
        monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", _raising)
    with _warns_once_if_broken(how, "mkldnn_reorder_conv2d_weight"):
        model, got = _optimized_detections(detector_pair, coco_image)
    _assert_same_detections(got, detector_pair[1])
    assert MKLDNN_REORDER.get() is None
    backbone = model.inference_backbone.get(model.backbone)
    assert isinstance(backbone, MkldnnLayout)
    assert any(isinstance(m, MkldnnConv2d) for m in backbone.modules())


@pytest.mark.parametrize("how", ["missing", "raises"])
def test_version_counter_fallback_detector(detector_pair, coco_image, monkeypatch, how):
    """Without version counters no backbone copy can be kept: the model's own backbone runs."""
    model = optimize_for_inference(copy.deepcopy(detector_pair[0]))
    _break_version_counter(monkeypatch, how)
    with _warns_once_if_broken(how, "_version"):
        got = model.detect([coco_image])[0]
    _assert_same_detections(got, detector_pair[1])
    assert VERSION_COUNTER.get() is None
    assert model.inference_backbone.get(model.backbone) is model.backbone


@pytest.mark.parametrize("how", ["missing", "raises", "wrong"])
def test_roi_helpers_fallback(detector_pair, coco_image, monkeypatch, how):
    """torchvision's private pooler helpers gone or changed: torchvision's own MultiScaleRoIAlign."""
    if how == "missing":
        helpers = types.SimpleNamespace()
    elif how == "raises":
        helpers = types.SimpleNamespace(_setup_scales=_raising, _convert_to_roi_format=_raising)
    else:  # an incompatible change: other level scales
        from torchvision.ops import poolers

        def setup_scales(features, image_shapes, canonical_scale, canonical_level):
            scales, mapper = poolers._setup_scales(features, image_shapes, canonical_scale, canonical_level)
            return [s / 2 for s in scales], mapper

        helpers = types.SimpleNamespace(
            _setup_scales=setup_scales, _convert_to_roi_format=poolers._convert_to_roi_format
        )
    monkeypatch.setattr(roi_align_module, "_tv_poolers", helpers)
    with _warns_once_if_broken(how, "_setup_scales"):
        _, got = _optimized_detections(detector_pair, coco_image)
    _assert_same_detections(got, detector_pair[1])
    assert ROI_HELPERS.get() is None


def test_efficientnet_lite_runs_channels_last_once_optimized():
    """The Lite0 backbone runs on NHWC tensors after optimize_for_inference (the same features,
    returned as NCHW), and so does a detector's backbone copy."""
    from omniseg.models.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    seen = []
    backbone.stem.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    x = torch.randn(1, 3, 97, 131)
    with torch.inference_mode():
        plain = backbone(x)
        fast = optimize_for_inference(backbone)(x)
        again = optimize_for_inference(backbone, channels_last=False)(x)
    assert seen == [False, True, False]
    for p, f, a in zip(plain, fast, again, strict=True):
        assert f.is_contiguous() and f.shape == p.shape
        scale = max(1.0, p.abs().max().item())
        assert (f - p).abs().max().item() <= 1e-4 * scale and (a - p).abs().max().item() <= 1e-4 * scale

    model = build_model({"name": "mask_rcnn", "backbone": "efficientnet_lite0", "num_classes": 5})
    optimize_for_inference(model)
    copy_ = model.inference_backbone.get(model.backbone)
    assert not isinstance(copy_, MkldnnLayout) and copy_.fast
    optimize_for_inference(model, channels_last=False)
    assert not model.inference_backbone.get(model.backbone).fast


def test_every_private_op_has_a_fallback_test():
    """A new PrivateOp needs its fallback test here."""
    tested = {FUSED_CONV, NNPACK_CONV, MKLDNN_REORDER, VERSION_COUNTER, ROI_HELPERS}
    assert set(PRIVATE_OPS.values()) == tested


# ------------------------------------------------------------------------------------- options
def test_plain_until_optimized_and_back():
    model = _detector()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fast_convs = [m for m in model.modules() if isinstance(m, FastConv2d)]
    pools = [m for m in model.modules() if isinstance(m, ParallelMultiScaleRoIAlign)]
    assert fast_convs and len(pools) == 2
    assert not any(m.gemm or m.winograd for m in fast_convs)
    assert not model.roi_heads.fast and not any(p.fast for p in pools) and model.inference_backbone is None

    model.train()
    assert optimize_for_inference(model) is model and not model.training
    assert model.inference_options == dict.fromkeys(INFERENCE_OPTIONS, True)
    assert all(m.gemm and m.winograd for m in fast_convs)
    assert model.roi_heads.fast and all(p.fast for p in pools)
    assert isinstance(model.inference_backbone, InferenceCopy)
    # the state dict (a checkpoint) is untouched
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())

    optimize_for_inference(model, **ALL_OFF)  # back to the plain computation
    assert not any(m.gemm or m.winograd for m in fast_convs)
    assert not model.roi_heads.fast and not any(p.fast for p in pools) and model.inference_backbone is None


def test_options_switch_their_paths_only():
    model = optimize_for_inference(_detector(), winograd=False, threaded_roi_align=False)
    convs = [m for m in model.modules() if isinstance(m, FastConv2d)]
    assert all(m.gemm and not m.winograd for m in convs)
    assert model.inference_backbone.winograd is False and model.inference_backbone.fold
    assert model.roi_heads.fast and not model.roi_heads.box_roi_pool.fast

    deeplab = optimize_for_inference(_deeplab(), fused_conv=False)
    blocks = [m for m in deeplab.modules() if isinstance(m, ConvBNAct)]
    assert all(b.fold_bn and not b.fused_conv for b in blocks)
    deeplab = optimize_for_inference(deeplab, fold_batchnorm=False)  # no folding, so nothing to fuse
    assert not any(b.fold_bn or b.fused_conv for b in blocks)


def test_config_keys_are_the_defaults():
    """Old configs' fast_inference / winograd keys still load, and set optimize_for_inference's defaults."""
    exact = _detector(fast_inference=False)
    assert exact.config["fast_inference"] is False
    optimize_for_inference(exact)
    assert exact.inference_options == ALL_OFF and exact.inference_backbone is None
    assert optimize_for_inference(exact, winograd=True).inference_options["winograd"]  # explicit wins

    direct = optimize_for_inference(_detector(winograd=False))
    assert direct.inference_options == {**dict.fromkeys(INFERENCE_OPTIONS, True), "winograd": False}
    rebuilt = build_model(direct.config)  # the config round trip keeps the default
    assert rebuilt.inference_defaults == direct.inference_defaults


def test_top_level_export():
    assert omniseg.optimize_for_inference is optimize_for_inference
