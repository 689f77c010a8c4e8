"""Backbones: one interface for every method in omniseg.

``build_backbone(name, output_stride=..., pretrained=...)`` returns a :class:`Backbone`: an
``nn.Module`` whose ``forward(x)`` gives four feature maps at the nominal strides 4, 8, 16 and 32,
with ``.channels`` and ``.strides`` describing them. An output stride of 8 or 16 is obtained the
DeepLab way, by replacing the stride of the last stage(s) with dilation, so the deeper maps keep
the resolution of the output stride while the receptive field keeps growing.

Names: ``resnet50``, ``resnet101`` (torchvision), ``efficientnet_lite0`` (ships ImageNet weights)
and ``timm:<model name>`` for any timm model that can return features at strides 4..32.

omniseg never downloads: ``pretrained=True`` loads weights that ship with an installed package
(EfficientNet-Lite0); ``pretrained="path"`` loads a local file; anything else is a clear error.
"""

from omniseg.models.backbones.registry import (
    Backbone,
    PretrainedWeightsUnavailable,
    build_backbone,
    list_backbones,
    load_weights_file,
    register_backbone,
)

# importing the backbone files registers them
from omniseg.models.backbones import efficientnet_lite, resnet  # noqa: E402,F401  isort: skip

__all__ = [
    "Backbone",
    "PretrainedWeightsUnavailable",
    "build_backbone",
    "list_backbones",
    "load_weights_file",
    "register_backbone",
]
