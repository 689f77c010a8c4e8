"""Building blocks shared by several methods (re-exported here; the code lives in the submodules).

* :mod:`~omniseg.models.layers.conv` -- :class:`ConvBNAct` (conv, BatchNorm, activation; BN folding
  and a fused oneDNN kernel once :func:`omniseg.optimize_for_inference` switches them on);
* :mod:`~omniseg.models.layers.atrous` -- :class:`AtrousDepthwiseConv2d`, a dilated depthwise conv
  computed by exact, faster rewrites;
* :mod:`~omniseg.models.layers.aspp` -- DeepLab's atrous spatial pyramid pooling;
* :mod:`~omniseg.models.layers.fast_inference` -- the CPU inference kernels of the detectors;
* :mod:`~omniseg.models.layers.private_ops` -- the private PyTorch APIs those use, each probed
  before use with the plain computation as fallback.
"""

from omniseg.models.layers.aspp import ASPP, ASPPConv, ASPPPooling, ASPPSeparableConv, atrous_rates_for
from omniseg.models.layers.atrous import AtrousDepthwiseConv2d, keep_grad_format
from omniseg.models.layers.conv import ConvBNAct, ConvFn, fold_batch_norm, run_conv

__all__ = [
    "ASPP",
    "ASPPConv",
    "ASPPPooling",
    "ASPPSeparableConv",
    "AtrousDepthwiseConv2d",
    "ConvBNAct",
    "ConvFn",
    "atrous_rates_for",
    "fold_batch_norm",
    "keep_grad_format",
    "run_conv",
]
