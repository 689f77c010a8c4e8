"""Mask2Former: deformable attention, equality with Hugging Face's model, training, post-processing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from omniseg.data.targets import finalize_target, training_target
from omniseg.models import build_model
from omniseg.models.backbones import Backbone
from omniseg.models.hf_import import (
    convert_hf_mask2former,
    hf_config_to_kwargs,
    load_hf_mask2former,
    mask2former_from_hf_directory,
    swin_backbone_from_hf,
)
from omniseg.models.layers.ms_deform_attn import (
    MSDeformAttn,
    grid_sample_deformable_attention,
    multi_scale_deformable_attention,
)
from omniseg.models.mask2former import Mask2Former
from omniseg.structures import CategoryTable, Segments

CATEGORIES = CategoryTable.from_dicts(
    [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 3, "name": "car", "isthing": 1},
        {"id": 100, "name": "road", "isthing": 0},
        {"id": 101, "name": "sky", "isthing": 0},
    ]
)
TINY = dict(
    hidden_dim=32,
    num_queries=8,
    num_heads=2,
    decoder_layers=3,
    decoder_ffn_dim=64,
    conv_dim=32,
    mask_dim=32,
    encoder_layers=1,
    encoder_heads=2,
    encoder_ffn_dim=64,
    num_points=256,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------- deformable attention
def _random_attention_inputs(
    generator, batch=2, heads=2, channels=4, queries=5, points=3, shapes=((6, 7), (3, 4), (2, 2))
):
    levels = len(shapes)
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, channels, generator=generator)
    # some locations outside [0, 1]: those samples read zeros (padding)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator)
    weights = weights / weights.flatten(-2).sum(-1)[..., None, None]
    return value, list(shapes), locations, weights


def _naive_deformable_attention(value, shapes, locations, weights):
    """Bilinear interpolation written out: pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H)."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = torch.zeros(batch, queries, heads, channels, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for level, (h, w) in enumerate(shapes):
                    image = value[b, starts[level] : starts[level + 1], m].double().reshape(h, w, channels)
                    for p in range(points):
                        x = float(locations[b, q, m, level, p, 0]) * w - 0.5
                        y = float(locations[b, q, m, level, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(channels, dtype=torch.float64)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += (1 - abs(x - xx)) * (1 - abs(y - yy)) * image[yy, xx]
                        out[b, q, m] += float(weights[b, q, m, level, p]) * sample
    return out.reshape(batch, queries, heads * channels)


def test_deformable_attention_equals_naive_bilinear_sum():
    g = torch.Generator().manual_seed(0)
    value, shapes, locations, weights = _random_attention_inputs(
        g, batch=1, queries=3, points=2, shapes=((3, 4), (2, 3))
    )
    ours = multi_scale_deformable_attention(value, shapes, locations, weights)
    naive = _naive_deformable_attention(value, shapes, locations, weights)
    assert ours.shape == (1, 3, 2 * 4)
    assert (ours.double() - naive).abs().max() < 1e-5


def test_deformable_attention_equals_hf():
    pytest.importorskip("transformers")
    from transformers.models.mask2former.modeling_mask2former import (
        multi_scale_deformable_attention as hf_multi_scale_deformable_attention,
    )

    g = torch.Generator().manual_seed(1)
    value, shapes, locations, weights = _random_attention_inputs(
        g, batch=2, heads=4, channels=8, queries=30, points=4
    )
    ours = multi_scale_deformable_attention(value, shapes, locations, weights)
    theirs = hf_multi_scale_deformable_attention(value, shapes, locations, weights)
    diff = (ours - theirs).abs().max().item()
    print(f"max |ours - HF| deformable attention: {diff:.3g}")
    assert diff < 1e-6
    # spatial shapes as a tensor give the same
    assert torch.equal(
        multi_scale_deformable_attention(value, torch.tensor(shapes), locations, weights), ours
    )


def test_deformable_attention_gradients_equal_grid_sample():
    """Training differentiates the sum w.r.t. values, locations (through the bilinear weights) and
    attention weights: all three equal grid_sample's."""
    g = torch.Generator().manual_seed(2)
    inputs = _random_attention_inputs(g, batch=2, heads=4, channels=8, queries=40, points=3)
    grads = []
    for function in (multi_scale_deformable_attention, grid_sample_deformable_attention):
        value, shapes, locations, weights = (x.clone().requires_grad_() if torch.is_tensor(x) else x for x in inputs)
        out = function(value, shapes, locations, weights)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), value.grad, locations.grad, weights.grad))
    for ours, reference in zip(*grads, strict=True):
        assert (ours - reference).abs().max() <= 1e-5 * max(reference.abs().max().item(), 1.0)


def test_deformable_attention_module_initialisation():
    """Offsets start on a ring, one direction per head at distances 1..P; weights start uniform."""
    attn = MSDeformAttn(embed_dim=16, num_heads=4, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    assert torch.allclose(bias[0, :, :, 0], torch.tensor([1.0, 2.0, 3.0]).expand(2, 3))  # head 0 looks right
    assert torch.allclose(bias[1, :, :, 1], torch.tensor([1.0, 2.0, 3.0]).expand(2, 3))  # head 1 looks down
    assert (attn.attention_weights.weight == 0).all() and (attn.attention_weights.bias == 0).all()
    query, value = torch.randn(1, 5, 16), torch.randn(1, 4 * 4 + 2 * 2, 16)
    out = attn(query, torch.rand(1, 5, 2, 2), value, [(4, 4), (2, 2)])
    assert out.shape == (1, 5, 16)


# --------------------------------------------------------------------- equality with HF's model
class _HFBackbone(Backbone):
    """HF's own backbone module behind our Backbone interface: both models see the same features."""

    def __init__(self, hf_backbone) -> None:
        super().__init__()
        self.hf = hf_backbone
        self.channels = list(hf_backbone.channels)

    def forward(self, x):
        return list(self.hf(x).feature_maps)


def _tiny_hf_mask2former(depths=(1, 1, 1, 1), **overrides):
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=list(depths),
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = transformers.Mask2FormerConfig(
        backbone_config=swin,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=2,
        decoder_layers=5,  # the initial prediction + 4 layers: every level, one twice
        num_attention_heads=2,
        num_queries=8,
        num_labels=5,
        **overrides,
    )
    torch.manual_seed(0)
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


@pytest.mark.parametrize(("pre_norm", "size"), [(False, (64, 96)), (True, (72, 100))])
def test_matches_hf_mask2former_every_decoder_layer(pre_norm, size):
    hf = _tiny_hf_mask2former(pre_norm=pre_norm)
    kwargs = hf_config_to_kwargs(hf.config)
    assert kwargs["decoder_layers"] == 4 and kwargs["num_classes"] == 5
    ours = Mask2Former(_HFBackbone(hf.model.pixel_level_module.encoder), **kwargs).eval()
    missing = load_hf_mask2former(ours, hf.state_dict())
    assert missing and all(k.startswith("backbone.") for k in missing)
    # our deformable attention starts where HF's does (reference initialisation)
    hf_attn = hf.model.pixel_level_module.decoder.encoder.layers[0].self_attn
    assert torch.allclose(MSDeformAttn(32, 2, 3, 4).sampling_offsets.bias, hf_attn.sampling_offsets.bias)

    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(images, output_auxiliary_logits=True)
        outputs = ours.decode(ours.backbone(images), aux=True)
        raw = ours(images)
    ours_layers = [*outputs["aux_outputs"], outputs]
    hf_layers = [
        *[(a["class_queries_logits"], a["masks_queries_logits"]) for a in expected.auxiliary_logits],
        (expected.class_queries_logits, expected.masks_queries_logits),
    ]
    assert len(ours_layers) == len(hf_layers) == 5
    class_diff = max(
        (o["class_logits"] - c).abs().max().item() for o, (c, _) in zip(ours_layers, hf_layers, strict=True)
    )
    mask_diff = max(
        (o["mask_logits"] - m).abs().max().item() for o, (_, m) in zip(ours_layers, hf_layers, strict=True)
    )
    print(
        f"pre_norm={pre_norm} {size}: max |ours - HF| class logits {class_diff:.3g}, mask logits {mask_diff:.3g}"
    )
    assert class_diff < 1e-4 and mask_diff < 1e-4
    assert raw["mask_logits"].shape == (2, 8, -(-size[0] // 4), -(-size[1] // 4))
    assert raw["class_logits"].shape == (2, 8, 6)
    # inference builds no earlier layer's full-size masks (attention masks from resized mask
    # features instead): the same last prediction
    assert (raw["mask_logits"] - outputs["mask_logits"]).abs().max() < 1e-5
    assert (raw["class_logits"] - outputs["class_logits"]).abs().max() < 1e-5
    assert ours.decode(ours.backbone(images))["aux_outputs"] == []
    # masks are neither empty nor full everywhere: the masked attention had something to mask
    assert 0 < (outputs["aux_outputs"][1]["mask_logits"] > 0).float().mean() < 1


# 128: stage maps 32, 16, 8 (whole 4x4 windows, shifted) and 4 (one window); 100 x 140: maps 25 x 35,
# 13 x 18, 7 x 9, 4 x 5 -- padded to whole windows before the shift, as HF and the original Swin
@pytest.mark.parametrize("size", [(128, 128), (100, 140)])
def test_whole_hf_model_converts_with_a_timm_swin_backbone(size):
    """HF's Swin weights in timm's SwinTransformer (+ per-stage norms): the whole model, image in,
    logits out, with shifted windows (two blocks per stage), at whole-window and padded sizes."""
    hf = _tiny_hf_mask2former(depths=(2, 2, 2, 2))
    backbone = swin_backbone_from_hf(hf.config.backbone_config, hf.state_dict(), img_size=size)
    ours = Mask2Former(backbone, **hf_config_to_kwargs(hf.config)).eval()
    load_hf_mask2former(ours, hf.state_dict())
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(images, output_auxiliary_logits=True, output_hidden_states=True)
        features = ours.backbone(images)
        outputs = ours.decode(features, aux=True)
    feature_diff = max(
        (f - e).abs().max().item() for f, e in zip(features, expected.encoder_hidden_states, strict=True)
    )
    ours_layers = [*outputs["aux_outputs"], outputs]
    hf_layers = [
        *[(a["class_queries_logits"], a["masks_queries_logits"]) for a in expected.auxiliary_logits],
        (expected.class_queries_logits, expected.masks_queries_logits),
    ]
    class_diff = max(
        (o["class_logits"] - c).abs().max().item() for o, (c, _) in zip(ours_layers, hf_layers, strict=True)
    )
    mask_diff = max(
        (o["mask_logits"] - m).abs().max().item() for o, (_, m) in zip(ours_layers, hf_layers, strict=True)
    )
    print(f"swin: max |ours - HF| features {feature_diff:.3g}, class {class_diff:.3g}, mask {mask_diff:.3g}")
    assert feature_diff < 1e-4 and class_diff < 1e-4 and mask_diff < 1e-4


def test_save_pretrained_directory_converts(tmp_path):
    """A local save_pretrained directory (written here, nothing downloaded) gives the same model."""
    hf = _tiny_hf_mask2former()
    hf.save_pretrained(tmp_path)
    ours = mask2former_from_hf_directory(tmp_path, img_size=(64, 64)).eval()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, outputs = hf(images), ours(images)
    diff = max(
        (outputs["class_logits"] - expected.class_queries_logits).abs().max().item(),
        (outputs["mask_logits"] - expected.masks_queries_logits).abs().max().item(),
    )
    print(f"save_pretrained directory: max |ours - HF| {diff:.3g}")
    assert diff < 1e-4


def test_training_losses_match_hf():
    """Same weights, targets and random stream: the same matching, point samples and weighted
    losses as HF's Mask2FormerLoss, for the last layer and every deep-supervision output."""
    hf = _tiny_hf_mask2former(train_num_points=256)
    ours = Mask2Former(_HFBackbone(hf.model.pixel_level_module.encoder), **hf_config_to_kwargs(hf.config))
    load_hf_mask2former(ours, hf.state_dict())
    hf.train()
    ours.train()
    hf.model.pixel_level_module.encoder.eval()  # shared by both: no drop-path draws
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 96, generator=g)
    masks = [torch.rand(3, 64, 96, generator=g) > 0.6, torch.rand(2, 64, 96, generator=g) > 0.3]
    labels = [torch.tensor([0, 4, 2]), torch.tensor([1, 1])]
    torch.manual_seed(7)
    out = hf(images, output_auxiliary_logits=True)
    expected = hf.get_loss_dict(
        out.masks_queries_logits,
        out.class_queries_logits,
        [m.float() for m in masks],
        labels,
        out.auxiliary_logits,
    )
    torch.manual_seed(7)
    losses = ours(images, [{"labels": lab, "masks": m} for lab, m in zip(labels, masks, strict=True)])
    names = {"loss_cross_entropy": "loss_ce", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
    renamed = {}
    for key, value in expected.items():
        for hf_name, name in names.items():
            if key.startswith(hf_name):
                renamed[name + key[len(hf_name) :]] = value
    assert set(renamed) == set(losses) and len(losses) == 3 * 5
    diff = max((losses[k] - renamed[k]).abs().item() for k in losses)
    print(f"training losses: max |ours - HF| {diff:.3g} over {len(losses)} terms")
    assert diff < 1e-4


def test_hf_conversion_names_every_parameter():
    hf = _tiny_hf_mask2former()
    converted = convert_hf_mask2former(hf.state_dict())
    ours = Mask2Former(_HFBackbone(hf.model.pixel_level_module.encoder), **hf_config_to_kwargs(hf.config))
    expected = {k for k in ours.state_dict() if not k.startswith("backbone.")}
    assert set(converted) == expected
    with pytest.raises(KeyError, match="without a counterpart"):
        convert_hf_mask2former(
            {**hf.state_dict(), "model.transformer_module.new_thing.weight": torch.zeros(1)}
        )


# --------------------------------------------------------------------------------- training
def _panoptic_segments(h: int, w: int, shift: int) -> Segments:
    id_map = np.zeros((h, w), dtype=np.int32)
    id_map[: h // 2] = 1  # sky
    id_map[h // 2 :] = 2  # road
    id_map[8 + shift : 24 + shift, 8:30] = 3  # car
    id_map[30:56, 40 + shift : 52 + shift] = 4  # person
    id_map[4:10, 50:60] = 5  # a crowd of people: not a target
    return Segments(
        (h, w),
        [101, 100, 3, 1, 1],
        categories=CATEGORIES,
        iscrowd=[False, False, False, False, True],
        segment_ids=[1, 2, 3, 4, 5],
        id_map=id_map,
    )


def _tiny_model(**options):
    torch.manual_seed(0)
    return build_model({"name": "mask2former", "categories": CATEGORIES.to_dicts(), **TINY, **options})


def test_one_training_step_reaches_every_parameter():
    model = _tiny_model().train()
    assert json.loads(json.dumps(model.config))["name"] == "mask2former"
    h, w = 64, 64
    targets = [finalize_target(training_target(_panoptic_segments(h, w, s), CATEGORIES)) for s in (0, 4)]
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    losses = model(images, targets)
    # the last layer's and, deep supervision, the initial queries' and each earlier layer's
    expected = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1", "_2")}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert not [n for n, p in trainable.items() if p.grad is None], "parameters outside the graph"
    # The reference initialisation zeroes the weights from which deformable attention reads its
    # query (offsets, attention weights), so at the first step the encoder's position and level
    # embeddings cannot change the output: their gradient is exactly zero, not missing.
    zero = [n for n, p in trainable.items() if not p.grad.abs().sum() > 0]
    assert zero == ["pixel_decoder.level_embed"], f"parameters with a zero gradient: {zero}"
    # ... and once those weights have moved off zero, the embeddings learn too
    model.zero_grad()
    with torch.no_grad():
        model.pixel_decoder.layers[0].self_attn.sampling_offsets.weight.normal_(std=0.01)
    sum(model(images, targets).values()).backward()
    assert model.pixel_decoder.level_embed.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_crowd_segments_are_not_targets():
    from omniseg.models.mask2former import encode_mask_targets

    target = finalize_target(training_target(_panoptic_segments(64, 64, 0), CATEGORIES))
    (encoded,) = encode_mask_targets([target], CATEGORIES)
    assert encoded["labels"].tolist() == [3, 2, 1, 0]  # sky, road, car, person as table indices
    assert encoded["masks"].shape == (4, 64, 64)


# ----------------------------------------------------------------------------- post-process
@pytest.mark.parametrize("size", [(64, 80), (60, 76)])
def test_post_process_gives_segments_of_the_input_size(size):
    model = _tiny_model().eval()
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(images)
    assert outputs["class_logits"].shape == (2, 8, len(CATEGORIES) + 1)
    assert outputs["mask_logits"].shape[:2] == (2, 8)
    for task in model.tasks:
        options = {"object_mask_thresh": 0.0} if task == "panoptic" else {}
        segments = model.post_process(outputs, [size, size], task=task, **options)
        assert len(segments) == 2
        assert all(isinstance(s, Segments) and s.image_size == size for s in segments)
        if task == "instance":
            thing_ids = set(CATEGORIES.thing_ids)
            assert all(set(s.category_ids.tolist()) <= thing_ids for s in segments)
        if task == "semantic":
            assert segments[0].to_semantic().shape == size
    with pytest.raises(ValueError, match="does not do"):
        model.post_process(outputs, [size, size], task="detection")


def test_cached_position_tokens_are_the_embedding_and_serve_training_after_inference():
    from omniseg.models.layers.mask2former_decoder import sine_position_embedding, sine_position_tokens

    with torch.inference_mode():  # first asked for by inference...
        tokens = sine_position_tokens((5, 7), 8)
    assert torch.equal(tokens, sine_position_embedding((5, 7), 8).flatten(2).transpose(1, 2))
    assert sine_position_tokens((5, 7), 8) is tokens  # made once
    assert not tokens.is_inference()
    weight = torch.ones(16, requires_grad=True)
    (tokens * weight).sum().backward()  # ...then used where autograd saves it
    assert torch.allclose(weight.grad, tokens.sum((0, 1)))
