"""Mask^X R-CNN (Hu, Dollar, He, Darrell, Girshick, CVPR 2018: "Learning to Segment Every Thing"):
masks for classes that only have box labels, through a learned weight transfer.

    Mask R-CNN (mask_rcnn.py), with the mask predictor's last layer replaced:
      w_det(c) = [classification weights(c), box-regression weights(c)]   (1024 + 4 x 1024 for the box head)
      w_seg(c) = T(w_det(c))       T: Linear -> LeakyReLU(0.1) -> Linear  (or one Linear)
      mask logits(c) = w_seg(c) . deconv features        (28 x 28 per RoI, no bias, as the paper)
      [+ a class-agnostic MLP branch on the 14 x 14 mask features, added to every class]

Training is on A u B: boxes of every class, masks of the classes in A only (``has_mask`` in the
targets: a dataset's ``mask_classes`` option, or box-only labels; see
:class:`~omniseg.models.mask_rcnn.MaskRoIHeads`). With ``detach_det_weights`` (the paper's
stop-gradient) the mask loss trains T but not the detector's weights, so w_det stays a
detection embedding for every class -- which is why T's output is meaningful for B.

``mask_mode`` gives the paper's rows as configuration:

* ``"transfer"``: the weight transfer above (``transfer_input``: ``"cls+box"`` | ``"cls"`` | ``"box"``);
* ``"agnostic"``: one class-agnostic 1x1 mask classifier (the paper's baseline for B);
* ``"class_specific"``: Mask R-CNN's per-class classifier (the oracle, given masks for all classes).

``mlp_mask_branch`` adds the class-agnostic MLP branch ("transfer + MLP"). Departure from the
reference: its MLP reads the 14 x 14 mask-head features through a 3x3 convolution that halves the
channels (PANet's fused branch) instead of the 28 x 28 deconvolution output -- at 256 channels that
fully connected layer alone would hold 157 M weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from omniseg.models import register_model
from omniseg.models.backbones import build_backbone
from omniseg.models.layers.detection import as_category_table, resolve_num_classes
from omniseg.models.mask_rcnn import MaskRCNN

__all__ = ["MASK_MODES", "TRANSFER_INPUTS", "MaskXRCNN", "TransferMaskPredictor", "mask_x_rcnn"]

MASK_MODES = ("transfer", "agnostic", "class_specific")
TRANSFER_INPUTS = ("cls+box", "cls", "box")
MASK_SIZE = 28  # RoI mask resolution: 14 x 14 RoIAlign, one 2x deconvolution


def detection_weights(box_predictor: FastRCNNPredictor, source: str) -> Tensor:
    """``(K, D)`` per-class detection weights: classification (D = 1024), box regression (its four
    rows of class c concatenated, D = 4096) or both (D = 5120)."""
    k = box_predictor.cls_score.out_features
    parts = {
        "cls": [box_predictor.cls_score.weight],
        "box": [box_predictor.bbox_pred.weight.reshape(k, -1)],
    }
    parts["cls+box"] = parts["cls"] + parts["box"]
    return torch.cat(parts[source], 1)


class TransferMaskPredictor(nn.Module):
    """Deconvolution (as torchvision's ``MaskRCNNPredictor``) + per-class logits: transferred from
    the box head's weights, class-agnostic or class-specific (``mask_mode``); returns
    ``(N, K, 28, 28)`` logits like torchvision's, so its loss and inference apply unchanged."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        box_predictor: FastRCNNPredictor,
        *,
        mask_mode: str = "transfer",
        transfer_input: str = "cls+box",
        transfer_hidden: int | None = None,
        detach_det_weights: bool = True,
        mlp_mask_branch: bool = False,
    ) -> None:
        super().__init__()
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if transfer_input not in TRANSFER_INPUTS:
            raise ValueError(f"transfer_input must be one of {TRANSFER_INPUTS}, got {transfer_input!r}")
        self.conv5_mask = nn.ConvTranspose2d(channels, channels, 2, 2)
        self.num_classes, self.mask_mode = num_classes, mask_mode
        self.transfer_input, self.detach_det_weights = transfer_input, detach_det_weights
        # the box head lives in roi_heads.box_predictor; kept out of this module's parameters and
        # state dict (a second registration would save the same tensors under two names)
        self._box_predictor = (box_predictor,)
        if mask_mode == "transfer":
            dim_in = detection_weights(box_predictor, transfer_input).shape[1]
            layers: list[nn.Module] = (
                [nn.Linear(dim_in, channels)]
                if transfer_hidden is None
                else [nn.Linear(dim_in, transfer_hidden), nn.LeakyReLU(0.1), nn.Linear(transfer_hidden, channels)]
            )
            self.transfer = nn.Sequential(*layers)
            for layer in self.transfer:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, a=0.1)
                    nn.init.zeros_(layer.bias)
            self.classifier = None
        else:
            self.transfer = None
            self.classifier = nn.Conv2d(channels, 1 if mask_mode == "agnostic" else num_classes, 1)
            # a class-agnostic classifier is trained by every RoI: start it small (the reference's
            # Gaussian 0.001) so that the early mask loss does not diverge
            nn.init.normal_(self.classifier.weight, std=0.001 if mask_mode == "agnostic" else 0.01)
            nn.init.zeros_(self.classifier.bias)
        self.mlp = None
        if mlp_mask_branch:
            reduced = channels // 2
            self.mlp = nn.Sequential(
                nn.Conv2d(channels, reduced, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Flatten(),
                nn.Linear(reduced * (MASK_SIZE // 2) ** 2, MASK_SIZE**2),
            )
            nn.init.normal_(self.mlp[-1].weight, std=0.001)
            nn.init.zeros_(self.mlp[-1].bias)

    def class_weights(self) -> Tensor:
        """``(K, C)`` mask classifier weights w_seg = T(w_det) (``mask_mode="transfer"`` only)."""
        if self.transfer is None:
            raise ValueError(f"mask_mode {self.mask_mode!r} has no transferred weights")
        w_det = detection_weights(self._box_predictor[0], self.transfer_input)
        return self.transfer(w_det.detach() if self.detach_det_weights else w_det)

    def forward(self, x: Tensor) -> Tensor:
        features = F.relu(self.conv5_mask(x))
        if self.transfer is not None:
            logits = torch.einsum("nchw,kc->nkhw", features, self.class_weights())
        else:
            logits = self.classifier(features)
            if self.mask_mode == "agnostic":  # every class reads the one channel
                logits = logits.expand(-1, self.num_classes, -1, -1)
        if self.mlp is not None:
            logits = logits + self.mlp(x).view(-1, 1, MASK_SIZE, MASK_SIZE)
        return logits


class MaskXRCNN(MaskRCNN):
    """Mask R-CNN whose mask classifier is :class:`TransferMaskPredictor` (module docstring)."""

    def __init__(
        self,
        backbone,
        *,
        num_classes: int,
        mask_mode: str = "transfer",
        transfer_input: str = "cls+box",
        transfer_hidden: int | None = 256,
        detach_det_weights: bool = True,
        mlp_mask_branch: bool = False,
        mask_head_channels: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, num_classes=num_classes, mask_head_channels=mask_head_channels, **kwargs)
        self.roi_heads.mask_predictor = TransferMaskPredictor(
            mask_head_channels, num_classes, self.roi_heads.box_predictor, mask_mode=mask_mode,
            transfer_input=transfer_input, transfer_hidden=transfer_hidden,
            detach_det_weights=detach_det_weights, mlp_mask_branch=mlp_mask_branch,
        )  # fmt: skip


@register_model("mask_x_rcnn")
def mask_x_rcnn(
    *,
    num_classes: int | None = None,
    categories: Any = None,
    backbone: str = "resnet50",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> MaskXRCNN:
    """Mask^X R-CNN on ``backbone``; ``kwargs`` go to :class:`MaskXRCNN` (``mask_mode``,
    ``transfer_input``, ``transfer_hidden`` -- None for a linear T --, ``detach_det_weights``,
    ``mlp_mask_branch``) and on to :class:`~omniseg.models.mask_rcnn.MaskRCNN`."""
    table = as_category_table(categories)
    return MaskXRCNN(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=resolve_num_classes(num_classes, table),
        categories=table,
        **kwargs,
    )

