"""torchvision ResNet-50/101 as a :class:`Backbone`, dilated for output stride 8 or 16.

The submodules keep torchvision's names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``), so a
torchvision ImageNet checkpoint loads as is (minus ``fc``), and so does the ``backbone.*`` part
of a torchvision DeepLabV3 / FCN checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from omniseg.models.backbones.registry import (
    Backbone,
    PretrainedWeightsUnavailable,
    load_weights_file,
    register_backbone,
)

_ARCHS = ("resnet50", "resnet101")  # torchvision.models constructors, imported when one is built

# torchvision's replace_stride_with_dilation flags for layer2..layer4
_DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


class ResNetBackbone(Backbone):
    """torchvision ResNet (bottleneck) returning the outputs of ``layer1`` .. ``layer4``."""

    def __init__(self, arch: str = "resnet50", *, output_stride: int = 32) -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"unknown ResNet {arch!r}; expected one of {list(_ARCHS)}")
        if output_stride not in _DILATION:
            raise ValueError(f"output_stride must be one of {sorted(_DILATION)}, got {output_stride}")
        # weights=None: never download; pretrained weights come from a local file.
        # lazily: torchvision.models pulls in torch._dynamo, 1-2 s of start-up for every other backbone
        import torchvision.models

        net = getattr(torchvision.models, arch)(weights=None, replace_stride_with_dilation=_DILATION[output_stride])
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        self.arch = arch
        self.output_stride = output_stride
        self.channels = [256, 512, 1024, 2048]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c4 = self.layer1(x)
        c8 = self.layer2(c4)
        c16 = self.layer3(c8)
        c32 = self.layer4(c16)
        return [c4, c8, c16, c32]

    def stem_modules(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.layer1]

    def load_torchvision_state_dict(self, state_dict: Mapping[str, Tensor], *, strict: bool = True) -> None:
        """Load a torchvision ResNet state dict (``fc.*`` is dropped; ``module.`` prefixes stripped)."""
        cleaned = {}
        for key, value in state_dict.items():
            key = key.removeprefix("module.")
            if key.startswith("fc."):
                continue
            cleaned[key] = value
        result = self.load_state_dict(cleaned, strict=False)
        if strict and (result.missing_keys or result.unexpected_keys):
            raise KeyError(
                f"{self.arch}: state dict does not match torchvision's layout; "
                f"missing {result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
            )


def _build(arch: str, output_stride: int, pretrained: bool | str) -> ResNetBackbone:
    model = ResNetBackbone(arch, output_stride=output_stride)
    if pretrained is True:
        raise PretrainedWeightsUnavailable(
            f"omniseg works offline and ships no {arch} weights; download torchvision's ImageNet "
            f"checkpoint yourself and pass its path, e.g. pretrained='/path/to/{arch}.pth'"
        )
    if pretrained:
        model.load_torchvision_state_dict(load_weights_file(pretrained))
    return model


@register_backbone("resnet50")
def build_resnet50(*, output_stride: int = 32, pretrained: bool | str = False) -> ResNetBackbone:
    """torchvision ResNet-50; ``pretrained`` may be a local torchvision ``.pth`` file."""
    return _build("resnet50", output_stride, pretrained)


@register_backbone("resnet101")
def build_resnet101(*, output_stride: int = 32, pretrained: bool | str = False) -> ResNetBackbone:
    """torchvision ResNet-101; ``pretrained`` may be a local torchvision ``.pth`` file."""
    return _build("resnet101", output_stride, pretrained)
