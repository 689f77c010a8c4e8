"""``omniseg export --format onnx|openvino``: the graph of a trained zoo model, run by onnxruntime and
OpenVINO, gives the eager model's logits on real CamVid frames at several sizes and batch sizes;
the file loads with neither omniseg nor torch importable; ``omniseg segment --runtime onnx|openvino``
writes the files eager writes; models that cannot export, and missing folders, get clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from omniseg.checkpoint import load_model
from omniseg.cli import main
from omniseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from omniseg.predictor import resolve_checkpoint

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install 'omniseg[export]'")
pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install 'omniseg[export]'")

ZOO_MODEL = "camvid-deeplabv3plus-lite0"
ASSET = Path(__file__).resolve().parents[1] / "assets" / "camvid_0016E5_07959.png"  # a CamVid val frame


def _frames() -> list[np.ndarray]:
    """Two real CamVid val frames (360x480): the repo's asset and, where the shared data is present,
    another val frame (else the asset mirrored, still a real photo)."""
    first = np.asarray(Image.open(ASSET).convert("RGB"))
    from conftest import SHARED_DATA

    others = sorted((SHARED_DATA / "camvid" / "val").glob("*.png"))
    second = np.asarray(Image.open(others[len(others) // 2]).convert("RGB")) if others else first[:, ::-1].copy()
    return [first, second]


def _normalised(frames: list[np.ndarray], size: tuple[int, int] | None = None) -> torch.Tensor:
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
    if size is not None:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((x - mean) / std).contiguous()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The zoo model exported once to OpenVINO (which writes model.onnx too), and the eager model."""
    pytest.importorskip("openvino", reason="openvino not installed: pip install 'omniseg[openvino]'")
    out = tmp_path_factory.mktemp("export") / "camvid"
    assert main(["export", "--model", ZOO_MODEL, "--format", "openvino", "--out", str(out)]) == 0
    model, _ = load_model(resolve_checkpoint(ZOO_MODEL))
    return out, model.eval()


# full frames (batch 2), an odd size the export never saw (batch 2), and one frame alone (batch 1)
CASES = [(None, 2), ((197, 263), 2), ((240, 320), 1)]


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_graph_logits_equal_eager_on_real_frames(exported, runtime):
    out, model = exported
    meta = json.loads((out / "model.json").read_text())
    assert meta["input"]["mean"] == list(IMAGENET_MEAN) and meta["outputs"] == ["logits"]
    if runtime == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(["logits"], {"images": x})[0]  # noqa: E731
    else:
        import openvino

        compiled = openvino.Core().compile_model(str(out / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        run = lambda x: compiled(x)[0]  # noqa: E731
    frames = _frames()
    for size, batch in CASES:
        x = _normalised(frames[:batch], size)
        with torch.no_grad():
            eager = model(x)
        graph = torch.from_numpy(np.asarray(run(x.numpy())))
        assert graph.shape == eager.shape == (batch, len(meta["categories"]), *x.shape[2:])
        assert (graph - eager).abs().max().item() < 1e-4, (runtime, size, batch)
        # and the logits are a trained model's, not a degenerate constant: labels vary over the frame
        assert eager.argmax(1).unique().numel() >= 4


def test_exported_graph_runs_with_neither_omniseg_nor_torch(exported, tmp_path):
    out, model = exported
    x = _normalised(_frames()[:1], (160, 224))
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(x).numpy())
    np.save(tmp_path / "images.npy", x.numpy())
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("omniseg", "torch", "torchvision", "timm"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np, onnxruntime as ort
session = ort.InferenceSession({str(out / "model.onnx")!r}, providers=["CPUExecutionProvider"])
logits = session.run(["logits"], {{"images": np.load({str(tmp_path / "images.npy")!r})}})[0]
expected = np.load({str(tmp_path / "expected.npy")!r})
print(float(np.abs(logits - expected).max()), sorted(m for m in sys.modules if m.split(".")[0] in ("omniseg", "torch")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    diff, imported = done.stdout.rsplit(" ", 1)[0], done.stdout.strip().rsplit(" ", 1)[1]
    assert float(diff) < 1e-4 and imported == "[]"


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_segment_with_a_runtime_writes_what_eager_writes(exported, runtime, tmp_path):
    out, _ = exported
    images = tmp_path / "images"
    images.mkdir()
    for i, frame in enumerate(_frames()):
        Image.fromarray(frame).save(images / f"frame{i}.png")
    eager_dir, graph_dir = tmp_path / "eager", tmp_path / runtime
    assert main(["segment", str(images), "--model", ZOO_MODEL, "--out", str(eager_dir), "--quiet"]) == 0
    assert main(["segment", str(images), "--model", str(out), "--runtime", runtime, "--out", str(graph_dir), "--quiet"]) == 0
    eager_files = sorted(p.relative_to(eager_dir) for p in eager_dir.rglob("*") if p.is_file())
    graph_files = sorted(p.relative_to(graph_dir) for p in graph_dir.rglob("*") if p.is_file())
    assert eager_files == graph_files and len(eager_files) >= 6
    for rel in eager_files:
        if rel.suffix == ".png":
            # identical pixels: logits within 1e-5 of eager leave no arg-max tie on these frames
            assert np.array_equal(np.asarray(Image.open(eager_dir / rel)), np.asarray(Image.open(graph_dir / rel))), rel
        elif rel.suffix == ".json":
            a, b = json.loads((eager_dir / rel).read_text()), json.loads((graph_dir / rel).read_text())
            # everything equal but the segments' mean-probability scores, equal up to float32 rounding
            scores = [(sa.pop("score"), sb.pop("score")) for sa, sb in zip(a["segments"], b["segments"], strict=True)]
            assert a == b and len(scores) >= 4, rel
            assert np.allclose(*zip(*scores, strict=True), rtol=0, atol=1e-5), rel


def test_detectors_refuse_graph_export_with_the_reason(tmp_path, capsys):
    code = main(["export", "--model", "cityscapes-mask-rcnn-lite0", "--format", "onnx", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code != 0 and "mask_rcnn" in err and "cannot be exported to onnx" in err and "safetensors" in err
    assert not (tmp_path / "x" / "model.onnx").exists()


def test_segment_runtime_needs_an_export_folder(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.open(ASSET).save(image)
    missing = tmp_path / "no-such-export"
    assert main(["segment", str(image), "--model", str(missing), "--runtime", "onnx", "--out", str(tmp_path / "o")]) != 0
    assert str(missing) in capsys.readouterr().err
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"")
    assert main(["segment", str(image), "--model", str(half), "--runtime", "onnx", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert str(half / "model.json") in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_an_export_folder_loads_by_its_own_format(exported):
    import omniseg
    from omniseg.runtime import GraphModel

    out, model = exported
    predictor = omniseg.load(str(out))  # runtime "auto": model.json says openvino
    assert isinstance(predictor.model, GraphModel) and predictor.model.runtime == "openvino"
    assert omniseg.load(str(out), runtime="onnx").model.runtime == "onnx"
    image = np.asarray(Image.open(ASSET).convert("RGB"))
    eager = omniseg.load(ZOO_MODEL)
    assert not isinstance(eager.model, GraphModel)
    a, b = predictor.predict(image, flip=False, scales=[1.0]), eager.predict(image, flip=False, scales=[1.0])
    assert np.array_equal(a.to_semantic(), b.to_semantic()) and len(np.unique(a.to_semantic())) >= 4


@pytest.fixture(scope="module")
def retinanet_export(tmp_path_factory):
    """A RetinaNet (ImageNet backbone, its class logits widened so that scores spread over (0, 1)
    and real frames give dozens of detections) saved as a checkpoint and exported to ONNX."""
    from omniseg.checkpoint import save_checkpoint
    from omniseg.export import export_graph
    from omniseg.models import build_model
    from omniseg.structures import CategoryTable

    tmp = tmp_path_factory.mktemp("retinanet")
    torch.manual_seed(0)
    categories = CategoryTable.from_dicts([{"id": i + 1, "name": f"class{i}", "isthing": True} for i in range(5)])
    config = {"name": "retinanet", "backbone": "efficientnet_lite0", "pretrained_backbone": True, "num_classes": 6,
              "min_size": None, "fpn_channels": 64, "topk_candidates": 100, "detections_per_img": 50}  # fmt: skip
    model = build_model(config).eval()
    with torch.no_grad():
        model.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        model.head.classification_head.cls_logits.bias.fill_(-2.0)
    save_checkpoint(tmp / "best", model, model_config=config, categories=categories, extra={"task": "detection"})
    export_graph(tmp / "best", tmp / "onnx", format="onnx")
    return tmp / "onnx", model


def test_retinanet_graph_gives_eager_detections_on_real_frames(retinanet_export):
    from omniseg.runtime import load_exported

    out, model = retinanet_export
    meta = json.loads((out / "model.json").read_text())
    assert meta["outputs"] == ["cls_logits", "bbox_regression"] and meta["input"]["size_multiple"] == 32
    graph = load_exported(out, runtime="onnx").model
    frames = [_frames()[0]]  # the CamVid frame (360x480: padded to 384x480), and a COCO photo if present
    from conftest import SHARED_DATA

    coco = sorted((SHARED_DATA / "coco128_seg" / "images").rglob("*.jpg"))
    frames.append(np.asarray(Image.open(coco[3]).convert("RGB")) if coco else frames[0][:300, :400].copy())
    for image in frames:
        x = _normalised([image])
        with torch.no_grad():
            dense = model.dense_network()(F.pad(x, (0, -x.shape[3] % 32, 0, -x.shape[2] % 32)))
            eager = model(x)[0]
        run = graph.run_graph(F.pad(x, (0, -x.shape[3] % 32, 0, -x.shape[2] % 32)))
        assert all((a - b).abs().max().item() < 1e-4 for a, b in zip(run, dense, strict=True))
        ours = graph(x)[0]
        assert len(eager["boxes"]) >= 10 and torch.equal(ours["labels"], eager["labels"])
        assert (ours["boxes"] - eager["boxes"]).abs().max().item() < 1e-3
        assert (ours["scores"] - eager["scores"]).abs().max().item() < 1e-5
