"""Any timm model as a :class:`Backbone` (``build_backbone("timm:<name>")``).

timm's ``features_only=True`` wrapper does the work; we pick, among the model's feature levels,
the last one at each nominal stride 4, 8, 16, 32, and pass ``output_stride`` through to timm, which
dilates the last stages the DeepLab way for the models that support it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from omniseg.models.backbones.registry import Backbone, PretrainedWeightsUnavailable

NOMINAL_STRIDES = (4, 8, 16, 32)


def nominal_out_indices(model_name: str, **kwargs) -> list[int]:
    """Indices of timm's feature levels at strides 4, 8, 16, 32 (the last level at each stride)."""
    import timm

    try:
        # Built on the meta device only to read its feature_info: no memory, no initialisation cost.
        with torch.device("meta"):
            probe = timm.create_model(model_name, features_only=True, pretrained=False, **kwargs)
    except Exception:  # a model whose init does not run on meta: build it for real
        probe = timm.create_model(model_name, features_only=True, pretrained=False, **kwargs)
    reductions = list(probe.feature_info.reduction())
    indices = []
    for stride in NOMINAL_STRIDES:
        matches = [i for i, r in enumerate(reductions) if r == stride]
        if not matches:
            raise ValueError(
                f"timm model {model_name!r} has feature strides {reductions}; a backbone needs 4, 8, 16 and 32"
            )
        indices.append(matches[-1])
    return indices


class TimmBackbone(Backbone):
    """A timm ``features_only`` model returning features at nominal strides 4, 8, 16, 32."""

    def __init__(
        self, model_name: str, *, output_stride: int = 32, pretrained: bool | str = False, **kwargs
    ) -> None:
        super().__init__()
        import timm

        if pretrained is True:
            raise PretrainedWeightsUnavailable(
                f"omniseg works offline and does not download timm weights for {model_name!r}; "
                "pass a local weights file instead, e.g. pretrained='/path/to/model.safetensors'"
            )
        out_indices = nominal_out_indices(model_name, **kwargs)
        create_kwargs = dict(features_only=True, out_indices=out_indices, pretrained=False, **kwargs)
        if output_stride != 32:
            create_kwargs["output_stride"] = output_stride
        if pretrained:
            # timm loads a local file given as pretrained_cfg 'file' and adapts it to features_only.
            create_kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
        try:
            self.body = timm.create_model(model_name, **create_kwargs)
        except TypeError as exc:
            if "output_stride" in create_kwargs and "output_stride" in str(exc):
                raise ValueError(
                    f"timm model {model_name!r} does not support output_stride={output_stride}"
                ) from exc
            raise
        self.model_name = model_name
        self.output_stride = output_stride
        self.channels = list(self.body.feature_info.channels())

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))
