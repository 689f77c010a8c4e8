"""DeepLabV3 and DeepLabV3+ (semantic segmentation).

* :class:`DeepLabV3` (Chen et al. 2017): dilated backbone at output stride 8/16 -> ASPP -> 3x3 conv
  -> 1x1 classifier -> bilinear upsampling to the input size. Module names follow torchvision's
  ``deeplabv3_resnet50`` (``backbone``, ``classifier``, ``aux_classifier``), so
  :func:`load_torchvision_deeplabv3` loads its checkpoints and reproduces its logits.
* :class:`DeepLabV3Plus` (Chen et al. 2018): ASPP output upsampled to stride 4, concatenated with
  the stride-4 features reduced to 48 channels, refined by two 3x3 conv-BN-ReLU (256), 1x1
  classifier, upsampled to the input size. ``decoder_channels`` sets the width of those two convs
  and ``aspp_channels`` (default: the same) the ASPP's; at stride 4 the decoder is the model's
  largest cost after the encoder, so a light encoder pairs best with a narrower decoder. As in
  the official TF implementation (``aspp_with_separable_conv`` and ``decoder_use_separable_conv``, both on for v3+), the 3x3 convs
  of ASPP and decoder are depthwise-separable by default; ``separable=False`` makes them dense.

Both follow the omniseg model contract: ``forward(images)`` returns logits ``(B, C, H, W)`` at the
input resolution (any H, W); ``forward(images, {"semantic": (B, H, W) long})`` returns a dict of
named, already weighted scalar losses whose sum is the training objective.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.inference import validate_task
from omniseg.losses import semantic_cross_entropy
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers import ConvBNAct
from omniseg.models.layers.aspp import ASPP, atrous_rates_for
from omniseg.models.layers.dense_prediction import semantic_segments_from_scores
from omniseg.structures import CategoryTable, Segments

__all__ = [
    "DeepLabHead",
    "DeepLabV3",
    "DeepLabV3Plus",
    "FCNHead",
    "deeplabv3",
    "deeplabv3plus",
    "load_torchvision_deeplabv3",
    "semantic_cross_entropy",
]


# ---------------------------------------------------------------------------------------- heads
class DeepLabHead(nn.Sequential):
    """torchvision's DeepLabV3 head: ASPP -> 3x3 conv-BN-ReLU -> 1x1 classifier."""

    def __init__(
        self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36), *, dropout: float = 0.5
    ) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, 256, dropout=dropout),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1),
        )


class FCNHead(nn.Sequential):
    """torchvision's auxiliary FCN head: 3x3 conv (in/4 channels)-BN-ReLU -> dropout 0.1 -> 1x1."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, *, groups: int = 1) -> ConvBNAct:
    """conv - BN - ReLU with "same" padding (the decoder's building block; BN folds at inference)."""
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, groups=groups, bias=False
    )
    return ConvBNAct(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SeparableConvBNReLU(nn.Sequential):
    """3x3 depthwise - BN - ReLU - 1x1 pointwise - BN - ReLU (TF DeepLab ``split_separable_conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            conv_bn_relu(in_channels, in_channels, 3, groups=in_channels),
            conv_bn_relu(in_channels, out_channels, 1),
        )


# --------------------------------------------------------------------------------------- models
class _SemanticModel(nn.Module):
    """The training/inference contract and the loss shared by the DeepLab models; its keyword
    options (``aux``, ``aux_weight``, ``ignore_index``, ``class_weights``, ``label_smoothing``,
    ``ohem_thresh``, ``ohem_min_kept``, ``channels_last``) are every DeepLab's ``**options``.

    Raw outputs are logits ``(B, C, H, W)`` at the input resolution; :meth:`post_process` turns
    them into semantic :class:`Segments`, class ``k`` being ``categories``' ``k``-th category.
    """

    tasks: tuple[str, ...] = ("semantic",)
    target_fields: tuple[str, ...] = ("semantic",)  # the per-pixel map is all it learns from
    categories: CategoryTable | None = None

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        aux: bool = False,
        aux_weight: float = 0.5,
        ignore_index: int = 255,
        class_weights: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 100_000,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.aux_weight = aux_weight
        self.channels_last = channels_last
        # torchvision's aux head sits on the stride-16 features
        self.aux_classifier = FCNHead(backbone.channels[2], num_classes) if aux else None
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if weights.numel() != num_classes:
                raise ValueError(f"class_weights has {weights.numel()} entries for {num_classes} classes")
        # not persistent: the weights are part of the config, and torchvision checkpoints lack them
        self.register_buffer("class_weights", weights, persistent=False)
        self.config: dict = {}

    def _set_memory_format(self) -> None:
        # Called once all layers exist. oneDNN (CPU) and cuDNN run convolutions natively in NHWC, and
        # depthwise convs most of all: NCHW costs DeepLabV3+/Lite0 15-25% more CPU time here.
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def decode(self, features: list[Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self, images: Tensor, targets: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor] | None = None
    ) -> Tensor | dict[str, Tensor]:
        """Logits ``(B, C, H, W)`` at input size, or, given ``targets``, a dict of losses.

        ``targets``: one dict per image with ``"semantic"`` ``(H, W)`` class indices (the
        training targets of :func:`omniseg.data.targets.training_target`), or one dict whose
        ``"semantic"`` is the stacked ``(B, H, W)`` batch.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        size = images.shape[-2:]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images)
        # low-resolution logits back to NCHW first: cheap here, and the full-size output is contiguous
        logits = self.decode(features).contiguous()
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if targets is None:
            return logits
        target = targets["semantic"] if isinstance(targets, Mapping) else torch.stack([t["semantic"] for t in targets])
        target = target.to(logits.device)
        losses = {"loss_ce": self.loss(logits, target)}
        if self.aux_classifier is not None:
            aux = self.aux_classifier(features[2]).contiguous()
            aux = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
            losses["loss_aux"] = self.aux_weight * self.loss(aux, target)
        return losses

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy with this model's ignore index, class weights, smoothing and OHEM settings."""
        return semantic_cross_entropy(
            logits,
            target,
            ignore_index=self.ignore_index,
            class_weights=self.class_weights,
            label_smoothing=self.label_smoothing,
            ohem_thresh=self.ohem_thresh,
            ohem_min_kept=self.ohem_min_kept,
        )

    def post_process(
        self, outputs: Tensor, image_sizes: Sequence[Sequence[int]], *, task: str = "semantic", **_: object
    ) -> list[Segments]:
        """Semantic ``Segments`` per image (each segment scored by its mean softmax confidence).
        Options meant for other models (``score_thresh``) do not apply to a label map."""
        validate_task(self, task)
        return semantic_segments_from_scores(outputs, image_sizes, self.categories)


class DeepLabV3(_SemanticModel):
    """DeepLabV3: backbone -> :class:`DeepLabHead` on the deepest features -> upsample.

    ``atrous_rates`` defaults to the backbone's output stride (6/12/18 at 16, 12/24/36 at 8).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        atrous_rates: Sequence[int] | None = None,
        aspp_dropout: float = 0.5,
        **options: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **options)
        rates = tuple(atrous_rates) if atrous_rates is not None else atrous_rates_for(backbone.output_stride)
        self.classifier = DeepLabHead(backbone.channels[3], num_classes, rates, dropout=aspp_dropout)
        self._set_memory_format()

    def decode(self, features: list[Tensor]) -> Tensor:
        return self.classifier(features[3])


class DeepLabV3Plus(_SemanticModel):
    """DeepLabV3+: ASPP on the deepest features + decoder with the stride-4 skip (see module docstring)."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        *,
        aspp_channels: int | None = None,
        separable: bool = True,
        atrous_rates: Sequence[int] | None = None,
        aspp_dropout: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **options)
        rates = tuple(atrous_rates) if atrous_rates is not None else atrous_rates_for(backbone.output_stride)
        aspp_channels = aspp_channels or decoder_channels
        self.aspp = ASPP(backbone.channels[3], rates, aspp_channels, dropout=aspp_dropout, separable=separable)
        self.low_level = conv_bn_relu(backbone.channels[0], low_level_channels, 1)
        fused = aspp_channels + low_level_channels
        if separable:
            self.decoder = nn.Sequential(
                SeparableConvBNReLU(fused, decoder_channels),
                SeparableConvBNReLU(decoder_channels, decoder_channels),
            )
        else:
            self.decoder = nn.Sequential(
                conv_bn_relu(fused, decoder_channels, 3),
                conv_bn_relu(decoder_channels, decoder_channels, 3),
            )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self._set_memory_format()

    def decode(self, features: list[Tensor]) -> Tensor:
        low = self.low_level(features[0])
        context = self.aspp(features[3])
        context = F.interpolate(context, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.decoder(torch.cat([context, low], dim=1)))


# ------------------------------------------------------------------------- DeepLab v1 and v2
def _paper_rates(rates: Sequence[int], output_stride: int) -> tuple[int, ...]:
    """DeepLab v1/v2 rates are defined at output stride 8; at 16 or 32 they shrink in proportion."""
    return tuple(max(1, r * 8 // output_stride) for r in rates)


class LargeFOVHead(nn.Sequential):
    """DeepLab v1 LargeFOV head: fc6 (3x3 atrous) - ReLU - dropout - fc7 (1x1) - ReLU - dropout - fc8 (1x1).

    As in the paper there is no BatchNorm: the convs carry biases. fc6/fc7 get He-normal weights
    (they have no ImageNet fc layers to start from here), fc8 the paper's N(0, 0.01).
    ``forward`` returns class scores at the backbone's resolution.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        rate: int = 12,
        fc6_channels: int = 1024,
        fc7_channels: int = 1024,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        # the paper's layer names, in order (Sequential runs its children in insertion order)
        self.add_module("fc6", nn.Conv2d(in_channels, fc6_channels, 3, padding=rate, dilation=rate))
        self.add_module("relu6", nn.ReLU(inplace=True))
        self.add_module("drop6", nn.Dropout(dropout))
        self.add_module("fc7", nn.Conv2d(fc6_channels, fc7_channels, 1))
        self.add_module("relu7", nn.ReLU(inplace=True))
        self.add_module("drop7", nn.Dropout(dropout))
        self.add_module("fc8", nn.Conv2d(fc7_channels, num_classes, 1))
        self.rate = rate
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)


class ASPPLHead(nn.Module):
    """DeepLab v2 ASPP-L: one :class:`LargeFOVHead` branch per atrous rate; their class scores are summed."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        rates: Sequence[int] = (6, 12, 18, 24),
        fc6_channels: int = 1024,
        fc7_channels: int = 1024,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not rates:
            raise ValueError("ASPP-L needs at least one atrous rate")
        self.branches = nn.ModuleList(
            LargeFOVHead(
                in_channels, num_classes, rate=r, fc6_channels=fc6_channels, fc7_channels=fc7_channels, dropout=dropout
            )
            for r in rates
        )
        self.rates = tuple(rates)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.branches[0](x)
        for branch in self.branches[1:]:
            scores = scores + branch(x)
        return scores


class DeepLabV1(_SemanticModel):
    """DeepLab v1 (Chen et al. 2015), LargeFOV: backbone at output stride 8 -> :class:`LargeFOVHead` -> upsample.

    The paper's fc6/fc7 are 1024 wide on VGG-16's 512-channel conv5; the defaults here (512) suit
    EfficientNet-Lite0's 320-channel output: 1024 would make the head larger than the encoder
    (4.0M vs 3.0M parameters) and add ~45% to the stride-8 encoder's CPU latency.
    ``atrous_rate`` defaults to the paper's 12 at output stride 8 (scaled down at 16 / 32).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        atrous_rate: int | None = None,
        fc6_channels: int = 512,
        fc7_channels: int | None = None,
        dropout: float = 0.5,
        **options: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **options)
        rate = atrous_rate if atrous_rate is not None else _paper_rates((12,), backbone.output_stride)[0]
        self.classifier = LargeFOVHead(
            backbone.channels[3],
            num_classes,
            rate=rate,
            fc6_channels=fc6_channels,
            fc7_channels=fc7_channels or fc6_channels,
            dropout=dropout,
        )
        self._set_memory_format()

    def decode(self, features: list[Tensor]) -> Tensor:
        return self.classifier(features[3])


class DeepLabV2(_SemanticModel):
    """DeepLab v2 (Chen et al. 2017), ASPP-L: backbone at output stride 8 -> :class:`ASPPLHead` -> upsample.

    Four LargeFOV branches at rates 6, 12, 18, 24 (at output stride 8; scaled down at 16 / 32) whose
    class scores are summed. Each branch is 256 wide by default (the paper: 1024 on VGG-16): on
    EfficientNet-Lite0, four 1024-wide branches would hold 16M parameters (5x the encoder) and
    more than double the CPU latency; four 256-wide ones hold 3.2M and cost about as much as
    DeepLab v1's 512-wide head.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        atrous_rates: Sequence[int] | None = None,
        fc6_channels: int = 256,
        fc7_channels: int | None = None,
        dropout: float = 0.5,
        **options: Any,
    ) -> None:
        super().__init__(backbone, num_classes, **options)
        rates = (
            tuple(atrous_rates)
            if atrous_rates is not None
            else _paper_rates((6, 12, 18, 24), backbone.output_stride)
        )
        self.classifier = ASPPLHead(
            backbone.channels[3],
            num_classes,
            rates=rates,
            fc6_channels=fc6_channels,
            fc7_channels=fc7_channels or fc6_channels,
            dropout=dropout,
        )
        self._set_memory_format()

    def decode(self, features: list[Tensor]) -> Tensor:
        return self.classifier(features[3])


# ------------------------------------------------------------------------------------ importers
def load_torchvision_deeplabv3(model: DeepLabV3, state_dict: Mapping[str, Tensor]) -> None:
    """Load a torchvision ``deeplabv3_resnet50/101`` state dict into :class:`DeepLabV3`.

    Module names are identical, so no key is renamed; ``aux_classifier.*`` is dropped when the model
    has no auxiliary head. Strict otherwise: a shape or key mismatch raises.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if model.aux_classifier is None:
        state = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise KeyError(
            "state dict does not match torchvision's DeepLabV3 layout: "
            f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
        )


# ------------------------------------------------------------------------------------- builders
# Keyword-only builders in torchvision's style: the backbone arguments are the builder's own, every
# other keyword goes to the model class, so each constructor option is reachable from a config.
def _backbone(backbone: str, output_stride: int, pretrained_backbone: bool | str) -> Backbone:
    return build_backbone(backbone, output_stride=output_stride, pretrained=pretrained_backbone)


@register_model("deeplabv3")
def deeplabv3(
    *,
    num_classes: int,
    backbone: str = "resnet50",
    output_stride: int = 16,
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> DeepLabV3:
    """DeepLabV3 on ``backbone`` (any :func:`build_backbone` name) at ``output_stride`` 8 or 16;
    ``kwargs`` go to :class:`DeepLabV3` (``aux``, ``atrous_rates``, ``class_weights``, ...)."""
    return DeepLabV3(_backbone(backbone, output_stride, pretrained_backbone), num_classes, **kwargs)


@register_model("deeplabv3plus")
def deeplabv3plus(
    *,
    num_classes: int,
    backbone: str = "efficientnet_lite0",
    output_stride: int = 16,
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> DeepLabV3Plus:
    """DeepLabV3+ on ``backbone`` at ``output_stride`` 8 or 16; ``kwargs`` go to
    :class:`DeepLabV3Plus` (``decoder_channels``, ``aspp_channels``, ``separable``, ...)."""
    return DeepLabV3Plus(_backbone(backbone, output_stride, pretrained_backbone), num_classes, **kwargs)


@register_model("deeplabv1")
def deeplabv1(
    *,
    num_classes: int,
    backbone: str = "efficientnet_lite0",
    output_stride: int = 8,
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> DeepLabV1:
    """DeepLab v1 LargeFOV on ``backbone``, output stride 8 by default; ``kwargs`` go to
    :class:`DeepLabV1` (``atrous_rate``, ``fc6_channels``, ``fc7_channels``, ``dropout``, ...)."""
    return DeepLabV1(_backbone(backbone, output_stride, pretrained_backbone), num_classes, **kwargs)


@register_model("deeplabv2")
def deeplabv2(
    *,
    num_classes: int,
    backbone: str = "efficientnet_lite0",
    output_stride: int = 8,
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> DeepLabV2:
    """DeepLab v2 ASPP-L on ``backbone``, output stride 8 by default; ``kwargs`` go to
    :class:`DeepLabV2` (``atrous_rates``, ``fc6_channels``, ``fc7_channels``, ``dropout``, ...)."""
    return DeepLabV2(_backbone(backbone, output_stride, pretrained_backbone), num_classes, **kwargs)


__all__ += ["ASPPLHead", "DeepLabV1", "DeepLabV2", "LargeFOVHead", "deeplabv1", "deeplabv2"]
