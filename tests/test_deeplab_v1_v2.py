"""DeepLab v1 (LargeFOV) and v2 (ASPP-L): the paper's head computations, output stride 8, training."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omniseg.models import build_model, list_models
from omniseg.models.deeplab import ASPPLHead, DeepLabV1, DeepLabV2, LargeFOVHead, _SemanticModel


def _large_fov_reference(x: torch.Tensor, head: LargeFOVHead, rate: int) -> torch.Tensor:
    """fc6 (3x3, dilation ``rate``) - ReLU - fc7 (1x1) - ReLU - fc8 (1x1), written out with F.conv2d.

    The dilation comes from the caller, not from the module, so a wrong rate in the module shows.
    Dropout is the identity here (eval mode).
    """
    y = F.relu(F.conv2d(x, head.fc6.weight, head.fc6.bias, padding=rate, dilation=rate))
    y = F.relu(F.conv2d(y, head.fc7.weight, head.fc7.bias))
    return F.conv2d(y, head.fc8.weight, head.fc8.bias)


def _randomise(head: nn.Module) -> None:
    """O(1) weights and non-zero biases everywhere (fc8 starts at N(0, 0.01), zero bias), so that
    a comparison of head outputs is not a comparison of near-zeros."""
    torch.manual_seed(1)
    with torch.no_grad():
        for conv in head.modules():
            if isinstance(conv, nn.Conv2d):
                fan_in = conv.weight[0].numel()
                conv.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                conv.bias.uniform_(-0.5, 0.5)


def _small(name: str, **kwargs) -> nn.Module:
    return build_model({"name": name, "num_classes": 5, "fc6_channels": 24, "fc7_channels": 16, **kwargs})


def test_registered_and_inherit_the_semantic_model_contract() -> None:
    assert {"deeplabv1", "deeplabv2"} <= set(list_models())
    for cls in (DeepLabV1, DeepLabV2):
        assert issubclass(cls, _SemanticModel)
        # only the head is new: forward, loss, post-processing and the declared tasks are inherited
        assert {k for k, v in vars(cls).items() if callable(v)} == {"__init__", "decode"}
    model = _small("deeplabv2").eval()
    assert model.tasks == ("semantic",)
    logits = torch.randn(1, 5, 70, 90)
    (segments,) = model.post_process(logits, [(70, 90)])
    assert np.array_equal(segments.to_semantic(), logits[0].argmax(0).numpy())


def test_v1_head_is_the_paper_layer_sequence() -> None:
    torch.manual_seed(0)
    model = build_model({"name": "deeplabv1", "num_classes": 5}).eval()
    head = model.classifier
    _randomise(head)
    assert [type(m) for m in head] == [nn.Conv2d, nn.ReLU, nn.Dropout, nn.Conv2d, nn.ReLU, nn.Dropout, nn.Conv2d]
    assert head.fc6.kernel_size == (3, 3) and head.fc6.dilation == (12, 12)
    assert head.fc7.kernel_size == head.fc8.kernel_size == (1, 1)
    assert head.drop6.p == head.drop7.p == 0.5
    # the chosen defaults for EfficientNet-Lite0 (see DeepLabV1's docstring)
    assert (head.fc6.in_channels, head.fc6.out_channels, head.fc7.out_channels) == (320, 512, 512)
    assert head.fc8.out_channels == 5
    x = torch.randn(1, 320, 13, 17)
    with torch.no_grad():
        expected = _large_fov_reference(x, head, 12)
        assert expected.abs().max() > 0.1
        assert (head(x) - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
        # a wrong rate gives other scores: the comparison sees the dilation
        assert (head(x) - _large_fov_reference(x, head, 6)).abs().max() > 1e-2


def test_v2_scores_are_the_sum_of_four_branches_computed_separately() -> None:
    torch.manual_seed(0)
    head = _small("deeplabv2").classifier.eval()
    _randomise(head)
    assert isinstance(head, ASPPLHead) and len(head.branches) == 4
    # the branches are separate layers, not one shared conv
    assert len({b.fc6.weight.data_ptr() for b in head.branches}) == 4
    x = torch.randn(1, 320, 13, 17)
    with torch.no_grad():
        branches = [_large_fov_reference(x, b, r) for b, r in zip(head.branches, (6, 12, 18, 24), strict=True)]
        expected = sum(branches)
        scale = expected.abs().max().item()
        assert scale > 0.1
        assert (head(x) - expected).abs().max().item() <= 1e-5 * scale
    # none of the four is idle: leaving any one out changes the scores by far more than rounding
    assert all(b.abs().max().item() > 0.01 * scale for b in branches)


def test_model_logits_are_the_upsampled_head_scores_on_the_deepest_features() -> None:
    # ImageNet weights, so that the deepest features are O(1) (a random encoder's are ~1e-7 in eval)
    model = _small("deeplabv2", pretrained_backbone=True).eval()
    _randomise(model.classifier)
    images = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        features = model.backbone(images)[3]
        scores = sum(
            _large_fov_reference(features, b, r) for b, r in zip(model.classifier.branches, (6, 12, 18, 24), strict=True)
        )
        logits = model(images)
    expected = F.interpolate(scores, size=(97, 131), mode="bilinear", align_corners=False)
    assert logits.shape == (1, 5, 97, 131)
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("size", [(12, 16), (13, 17), (45, 60)])
def test_atrous_convs_have_the_stated_rates_and_keep_spatial_size(size: tuple[int, int]) -> None:
    v1, v2 = _small("deeplabv1"), _small("deeplabv2")
    convs = [(v1.classifier.fc6, 12)] + [(b.fc6, r) for b, r in zip(v2.classifier.branches, (6, 12, 18, 24), strict=True)]
    x = torch.randn(2, 320, *size)
    for conv, rate in convs:
        assert conv.kernel_size == (3, 3)
        assert conv.dilation == (rate, rate) and conv.padding == (rate, rate) and conv.stride == (1, 1)
        with torch.no_grad():
            assert conv(x).shape[-2:] == size
    for model in (v1, v2):
        with torch.no_grad():
            assert model.classifier.eval()(x).shape == (2, 5, *size)


def test_rates_follow_output_stride_and_can_be_set() -> None:
    assert _small("deeplabv1", output_stride=16).classifier.fc6.dilation == (6, 6)
    assert _small("deeplabv2", output_stride=16).classifier.rates == (3, 6, 9, 12)
    assert _small("deeplabv1", atrous_rate=4).classifier.fc6.dilation == (4, 4)
    v2 = _small("deeplabv2", atrous_rates=[2, 4])
    assert [b.fc6.dilation for b in v2.classifier.branches] == [(2, 2), (4, 4)]


@pytest.mark.parametrize("name", ["deeplabv1", "deeplabv2"])
def test_backbone_runs_at_output_stride_8(name: str) -> None:
    model = _small(name).eval()
    assert model.backbone.output_stride == 8
    seen: list[tuple[int, ...]] = []
    hook = model.classifier.register_forward_hook(lambda m, inputs, output: seen.append(tuple(inputs[0].shape)))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 97, 131))
    hook.remove()
    # the head sees the deepest (320-channel) map at ceil(97/8) x ceil(131/8), not at stride 16 or 32
    assert seen == [(1, 320, 13, 17)]
    assert logits.shape == (1, 5, 97, 131)
    features = model.backbone(torch.randn(1, 3, 97, 131))
    assert [tuple(f.shape[-2:]) for f in features] == [(25, 33), (13, 17), (13, 17), (13, 17)]


@pytest.mark.parametrize("name", ["deeplabv1", "deeplabv2"])
@pytest.mark.parametrize("aux", [False, True])
def test_gradients_reach_every_head_parameter(name: str, aux: bool) -> None:
    torch.manual_seed(0)
    model = _small(name, aux=aux).train()
    images = torch.randn(2, 3, 70, 90)
    target = torch.randint(0, 5, (2, 70, 90))
    target[:, :5] = 255
    losses = model(images, {"semantic": target})
    assert set(losses) == ({"loss_ce", "loss_aux"} if aux else {"loss_ce"})
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for pname, p in model.classifier.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ["deeplabv1", "deeplabv2"])
def test_overfits_a_camvid_frame(name: str, shared_data: Path) -> None:
    """Learning works end to end: a real train frame (downscaled 4x to 90x120) is fitted to >= 90%
    of its pixels in 40 steps (about 10 s on one core)."""
    root = shared_data / "camvid"
    if not (root / "train.txt").is_file():
        pytest.skip(f"CamVid not found at {root} (needs train.txt and the train split); not part of the repo")
    from omniseg.data.label_folder import camvid
    from omniseg.data.transforms import to_model_input

    dataset = camvid(root, "train")
    image, label = dataset.load_pair(0)
    label = torch.from_numpy(np.where(label == dataset.ignore_index, 255, label))
    size = (image.shape[0] // 4, image.shape[1] // 4)
    x = F.interpolate(to_model_input(image)[None], size=size, mode="bilinear", align_corners=False)
    y = F.interpolate(label[None, None].float(), size=size, mode="nearest")[:, 0].long()

    torch.manual_seed(0)
    model = build_model(
        {"name": name, "num_classes": 11, "pretrained_backbone": True, "fc6_channels": 64, "dropout": 0.0}
    )
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    optimizer = torch.optim.Adam([{"params": backbone, "lr": 3e-4}, {"params": head, "lr": 3e-3}])
    with torch.no_grad():
        before = (model.eval()(x).argmax(1) == y)[y != 255].float().mean().item()
    start = time.perf_counter()
    for _ in range(40):
        model.train()
        model.backbone.eval()  # frozen BN statistics (as DeepLab v1/v2 trained them): a batch of one
        loss = sum(model(x, {"semantic": y}).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)
    valid = y != 255
    accuracy = (pred[valid] == y[valid]).float().mean().item()
    assert before < 0.5
    assert accuracy >= 0.9, f"pixel accuracy {accuracy:.3f} after 40 steps ({elapsed:.1f} s)"
    assert elapsed < 120  # ~10 s on an idle core; generous for a shared machine


@pytest.mark.parametrize(
    "config",
    [
        {"name": "deeplabv1", "num_classes": 4, "fc6_channels": 32, "fc7_channels": 16, "atrous_rate": 10,
         "dropout": 0.3, "class_weights": [1, 2, 3, 4], "aux": True},
        {"name": "deeplabv2", "num_classes": 4, "fc6_channels": 16, "atrous_rates": [6, 12, 18, 24],
         "output_stride": 8, "label_smoothing": 0.1},
    ],
)  # fmt: skip
def test_builders_round_trip_through_config(config: dict) -> None:
    torch.manual_seed(0)
    model = build_model(config).eval()
    saved = json.loads(json.dumps(model.config))  # JSON-serialisable, every builder argument recorded
    assert saved["name"] == config["name"] and saved["backbone"] == "efficientnet_lite0"
    assert saved["output_stride"] == 8
    for key, value in config.items():
        assert saved[key] == value, key
    rebuilt = build_model(saved).eval()
    assert type(rebuilt) is type(model) and type(model) in (DeepLabV1, DeepLabV2)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same architecture
    x = torch.randn(1, 3, 75, 101)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    target = torch.randint(0, 4, (1, 75, 101))
    model.train()
    rebuilt.train()
    torch.manual_seed(1)
    a = model(x, {"semantic": target})
    torch.manual_seed(1)
    b = rebuilt(x, {"semantic": target})
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
