"""Start-up cost: loading a model imports its own method module and nothing it does not use.

torchvision's ops import ``torch._dynamo`` and the matchers ``scipy.optimize``: 2-3 s together of
every ``omniseg segment`` / ``serve`` / Ray actor start on a 2-core machine, for a DeepLab model
that needs neither; ``scipy.ndimage`` (boxes had come from its ``find_objects``) another 0.2-0.4 s.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from omniseg.models import list_models, registry
from omniseg.models.backbones.efficientnet_lite import DropPath


def test_every_model_lives_in_its_home_module() -> None:
    """The registry imports ``home_module(name)`` alone to build a model: it must be the right one."""
    for name in list_models():
        assert registry._MODELS[name].__module__ == f"omniseg.models.{registry.home_module(name)}", name


_PROBE = """
import json, sys
import numpy as np
import omniseg
predictor = omniseg.load("camvid-deeplabv3plus-lite0")
segments = predictor.predict(np.full((48, 64, 3), 100, dtype=np.uint8))
segments.boxes()  # the JSON's bbox
methods = sorted(m for m in sys.modules if m.startswith("omniseg.models.") and m.count(".") == 2
                 and m.split(".")[2] not in ("backbones", "layers", "registry", "optimize"))
print(json.dumps({"n": len(segments), "methods": methods,
                  "heavy": sorted(m for m in ("torchvision", "scipy.optimize", "scipy.ndimage", "torch._dynamo")
                            if m in sys.modules)}))
"""


def test_a_deeplab_model_loads_and_predicts_without_torchvision_or_scipy() -> None:
    out = json.loads(subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout)
    assert out["n"] >= 1
    assert out["methods"] == ["omniseg.models.deeplab"]
    assert out["heavy"] == []


def test_drop_path_equals_torchvision_stochastic_depth() -> None:
    from torchvision.ops import stochastic_depth

    x = torch.randn(64, 3, 4, 5)
    layer = DropPath(0.3).train()
    torch.manual_seed(7)
    ours = layer(x)
    torch.manual_seed(7)
    theirs = stochastic_depth(x, 0.3, "row", training=True)
    assert torch.equal(ours, theirs)
    dropped = (ours.flatten(1) == 0).all(dim=1)
    assert 0 < int(dropped.sum()) < 64  # some samples dropped, not all
    assert torch.allclose(ours[~dropped], x[~dropped] / 0.7)
    assert layer.eval()(x) is x
    with pytest.raises(ValueError, match="drop path probability"):
        DropPath(1.0)
