"""omniseg: semantic, instance and panoptic segmentation in one PyTorch toolkit."""

from omniseg.optimize import optimize_for_inference
from omniseg.structures import Category, CategoryTable, Instances, Sample, Segments

__version__ = "0.1.0"

__all__ = [
    "Category",
    "CategoryTable",
    "Instances",
    "Sample",
    "Segments",
    "__version__",
    "load",
    "optimize_for_inference",
]


def load(name_or_path: str = "camvid-deeplabv3plus-lite0", *, device: str = "cpu", runtime: str = "auto"):
    """Load a model by zoo name or checkpoint path, or an ``omniseg export --format onnx|openvino``
    folder (run by its runtime); returns a :class:`omniseg.predictor.Predictor`."""
    from omniseg.predictor import load_predictor

    return load_predictor(name_or_path, device=device, runtime=runtime)
