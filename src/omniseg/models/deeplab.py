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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers import ConvBNAct
from omniseg.models.layers.aspp import ASPP, atrous_rates_for

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


# ----------------------------------------------------------------------------------------- loss
def semantic_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int = 255,
    class_weights: Tensor | None = None,
    label_smoothing: float = 0.0,
    ohem_thresh: float | None = None,
    ohem_min_kept: int = 100_000,
) -> Tensor:
    """Per-pixel cross-entropy averaged over labelled pixels, optionally over hard pixels only (OHEM).

    The mean is PyTorch's weighted mean (``sum(loss) / sum(weight[target])``), but a batch with no
    labelled pixel gives 0 (with a gradient graph) instead of NaN.
    OHEM (as mmsegmentation's ``OHEMPixelSampler``): keep pixels whose predicted probability of the
    true class is below ``max(ohem_thresh, p_k)``, where ``p_k`` is the ``ohem_min_kept * B``-th
    smallest such probability, so that at least that many pixels are kept.
    """
    if logits.shape[-2:] != target.shape[-2:] or logits.shape[0] != target.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    target = target.long()
    pixel_loss = F.cross_entropy(
        logits,
        target,
        weight=class_weights,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    if class_weights is not None:
        pixel_weight = class_weights.to(logits.dtype)[safe_target] * valid
    else:
        pixel_weight = valid.to(logits.dtype)
    if ohem_thresh is not None:
        with torch.no_grad():
            prob = logits.softmax(dim=1).gather(1, safe_target.unsqueeze(1)).squeeze(1)
            valid_prob = prob[valid]
            if valid_prob.numel() > 0:
                k = min(ohem_min_kept * logits.shape[0], valid_prob.numel() - 1)
                kth = valid_prob.kthvalue(k + 1).values
                threshold = torch.clamp(kth, min=ohem_thresh)
                keep = valid & (prob < threshold)
            else:
                keep = valid
        pixel_loss = pixel_loss * keep
        pixel_weight = pixel_weight * keep
    return pixel_loss.sum() / pixel_weight.sum().clamp_min(torch.finfo(logits.dtype).tiny)


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
    """The training/inference contract and the loss shared by the DeepLab models."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        aux: bool,
        aux_weight: float,
        ignore_index: int,
        class_weights: Sequence[float] | Tensor | None,
        label_smoothing: float,
        ohem_thresh: float | None,
        ohem_min_kept: int,
        channels_last: bool,
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

    def forward(self, images: Tensor, targets: Mapping[str, Tensor] | None = None) -> Tensor | dict[str, Tensor]:
        """Logits ``(B, C, H, W)`` at input size, or, given ``targets``, a dict of losses."""
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
        target = targets["semantic"]
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

    @staticmethod
    def post_process_semantic(logits: Tensor) -> Tensor:
        """``(B, C, H, W)`` logits -> ``(B, H, W)`` class indices."""
        return logits.argmax(dim=1)


class DeepLabV3(_SemanticModel):
    """DeepLabV3: backbone -> :class:`DeepLabHead` on the deepest features -> upsample.

    ``atrous_rates`` defaults to the backbone's output stride (6/12/18 at 16, 12/24/36 at 8).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        aux: bool = False,
        *,
        atrous_rates: Sequence[int] | None = None,
        aspp_dropout: float = 0.5,
        aux_weight: float = 0.5,
        ignore_index: int = 255,
        class_weights: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 100_000,
        channels_last: bool = True,
    ) -> None:
        super().__init__(
            backbone,
            num_classes,
            aux=aux,
            aux_weight=aux_weight,
            ignore_index=ignore_index,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
            ohem_thresh=ohem_thresh,
            ohem_min_kept=ohem_min_kept,
            channels_last=channels_last,
        )
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
        aux: bool = False,
        atrous_rates: Sequence[int] | None = None,
        aspp_dropout: float = 0.1,
        aux_weight: float = 0.5,
        ignore_index: int = 255,
        class_weights: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
        ohem_thresh: float | None = None,
        ohem_min_kept: int = 100_000,
        channels_last: bool = True,
    ) -> None:
        super().__init__(
            backbone,
            num_classes,
            aux=aux,
            aux_weight=aux_weight,
            ignore_index=ignore_index,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
            ohem_thresh=ohem_thresh,
            ohem_min_kept=ohem_min_kept,
            channels_last=channels_last,
        )
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
def _build_backbone(options: dict) -> Backbone:
    """Pops the backbone arguments from a builder's ``options``; the rest go to the model."""
    return build_backbone(
        options.pop("backbone"), output_stride=options.pop("output_stride"), pretrained=options.pop("pretrained_backbone")
    )


@register_model("deeplabv3")
def deeplabv3(
    *,
    backbone: str = "resnet50",
    num_classes: int,
    output_stride: int = 16,
    pretrained_backbone: bool | str = False,
    aux: bool = False,
    atrous_rates: Sequence[int] | None = None,
    aspp_dropout: float = 0.5,
    aux_weight: float = 0.5,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ohem_thresh: float | None = None,
    ohem_min_kept: int = 100_000,
    channels_last: bool = True,
) -> DeepLabV3:
    """DeepLabV3 on ``backbone`` (any :func:`build_backbone` name) at ``output_stride`` 8 or 16."""
    options = dict(locals())
    return DeepLabV3(_build_backbone(options), **options)


@register_model("deeplabv3plus")
def deeplabv3plus(
    *,
    backbone: str = "efficientnet_lite0",
    num_classes: int,
    output_stride: int = 16,
    pretrained_backbone: bool | str = False,
    low_level_channels: int = 48,
    decoder_channels: int = 256,
    aspp_channels: int | None = None,
    separable: bool = True,
    aux: bool = False,
    atrous_rates: Sequence[int] | None = None,
    aspp_dropout: float = 0.1,
    aux_weight: float = 0.5,
    ignore_index: int = 255,
    class_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    ohem_thresh: float | None = None,
    ohem_min_kept: int = 100_000,
    channels_last: bool = True,
) -> DeepLabV3Plus:
    """DeepLabV3+ on ``backbone`` (any :func:`build_backbone` name) at ``output_stride`` 8 or 16."""
    options = dict(locals())
    return DeepLabV3Plus(_build_backbone(options), **options)
