"""OneFormer: task tokens, equality with Hugging Face's model, post-processing, joint training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omniseg.data.targets import finalize_target, training_target
from omniseg.models import build_model
from omniseg.models.backbones import Backbone
from omniseg.models.hf_import import (
    convert_hf_oneformer,
    load_hf_oneformer,
    oneformer_config_to_kwargs,
    oneformer_from_hf_directory,
    swin_backbone_from_hf,
)
from omniseg.models.layers.mask_classification import (
    instance_inference,
    panoptic_inference,
    semantic_inference,
)
from omniseg.models.oneformer import TASK_TEXT_IDS, OneFormer, task_targets, task_texts, task_token_ids
from omniseg.structures import CategoryTable, Segments

CATEGORIES = CategoryTable.from_dicts(
    [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 3, "name": "car", "isthing": 1},
        {"id": 100, "name": "road", "isthing": 0},
        {"id": 101, "name": "sky", "isthing": 0},
    ]
)
TASKS = ("panoptic", "instance", "semantic")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------- tokeniser
def test_task_token_ids_are_clip_bpe():
    """Our tokeniser on open_clip's vocabulary gives open_clip's ids and HF CLIPTokenizer's (built
    offline from the same merges) times its attention mask, as OneFormerProcessor feeds the model."""
    pytest.importorskip("open_clip")
    from omniseg.models.layers.clip_tokenizer import default_bpe_path, default_tokenizer

    texts = [f"the task is {t}" for t in TASKS] + [
        "a photo with a traffic light",
        "an panoptic photo",
        "a photo with a Potted-Plant & co's  TV",
        "a photo with a Potted-Plant &amp; co's  TV",  # CLIP unescapes HTML; HF's CLIPTokenizer does not
    ]
    ours = default_tokenizer().tokenize(texts)
    assert ours.shape == (len(texts), 77) and ours.dtype == torch.int64
    # the model's constants are what the tokeniser says
    for i, t in enumerate(TASKS):
        assert torch.equal(ours[i], task_token_ids(t)), t
    assert ours[0, :7].tolist() == [49406, *TASK_TEXT_IDS["panoptic"], 49407] and (ours[0, 7:] == 0).all()

    from open_clip.tokenizer import SimpleTokenizer

    assert torch.equal(SimpleTokenizer(str(default_bpe_path()))(texts, context_length=77), ours)

    transformers = pytest.importorskip("transformers")
    hf = _hf_clip_tokenizer(transformers, default_bpe_path())
    encoded = hf(texts[:-1], padding="max_length", max_length=77, truncation=True)
    theirs = torch.tensor(encoded["input_ids"]) * torch.tensor(encoded["attention_mask"])
    assert torch.equal(theirs, ours[:-1])
    assert torch.equal(ours[-1], ours[-2])


def _hf_clip_tokenizer(transformers, bpe_path):
    """transformers' CLIPTokenizer from vocab.json / merges.txt written from open_clip's merges file."""
    import gzip
    import json
    import tempfile
    from pathlib import Path

    from omniseg.models.layers.clip_tokenizer import ClipTokenizer

    ours = ClipTokenizer(bpe_path)
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[: 49152 - 256 - 2 + 1]
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.json").write_text(json.dumps(ours.encoder))
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *lines[1:]]) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


# --------------------------------------------------------------------- equality with HF's model
class _HFBackbone(Backbone):
    """HF's own backbone behind our Backbone interface: both models see the same features."""

    def __init__(self, hf_backbone) -> None:
        super().__init__()
        self.hf = hf_backbone
        self.channels = list(hf_backbone.channels)

    def forward(self, x):
        return list(self.hf(x).feature_maps)


def _tiny_hf_oneformer(depths=(1, 1, 1, 1), **overrides):
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=list(depths),
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        drop_path_rate=0.0,
    )
    options = dict(
        backbone_config=swin,
        conv_dim=64,  # = hidden_dim: HF registers no weights for the decoder's input projections
        mask_dim=64,
        hidden_dim=64,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=5,  # the initial prediction + 4 layers: every level, one twice
        num_attention_heads=2,
        num_queries=8,
        num_labels=len(CATEGORIES),
        text_encoder_width=64,
        text_encoder_num_layers=1,
        text_encoder_n_ctx=2,
        dropout=0.0,
    )
    options.update(overrides)
    torch.manual_seed(0)
    return transformers.OneFormerForUniversalSegmentation(transformers.OneFormerConfig(**options)).eval()


def _layers(outputs):
    return [*outputs["aux_outputs"], outputs]


def _max_diff(ours, hf_out):
    hf_layers = [
        *[(a["class_queries_logits"], a["masks_queries_logits"]) for a in hf_out.auxiliary_predictions],
        (hf_out.class_queries_logits, hf_out.masks_queries_logits),
    ]
    assert len(_layers(ours)) == len(hf_layers)
    class_diff = max(
        (o["class_logits"] - c).abs().max().item() for o, (c, _) in zip(_layers(ours), hf_layers, strict=True)
    )
    mask_diff = max(
        (o["mask_logits"] - m).abs().max().item() for o, (_, m) in zip(_layers(ours), hf_layers, strict=True)
    )
    return class_diff, mask_diff


@pytest.mark.parametrize(("pre_norm", "size"), [(False, (64, 96)), (True, (72, 100))])
def test_matches_hf_oneformer_for_every_task(pre_norm, size):
    hf = _tiny_hf_oneformer(pre_norm=pre_norm)
    kwargs = oneformer_config_to_kwargs(hf.config)
    assert kwargs["decoder_layers"] == 4 and not kwargs["text_encoder"]
    ours = OneFormer(_HFBackbone(hf.model.pixel_level_module.encoder), categories=CATEGORIES, **kwargs).eval()
    missing = load_hf_oneformer(ours, hf.state_dict())
    assert missing and all(k.startswith("backbone.") for k in missing)
    assert ours.text_mapper is None

    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    for task in TASKS:
        task_ids = task_token_ids(task)[None].expand(2, -1)
        with torch.no_grad():
            expected = hf(images, task_ids, output_auxiliary_logits=True)
            outputs = ours.decode(ours.backbone(images), task_ids, aux=True)
            raw = ours(images, task=task)
        class_diff, mask_diff = _max_diff(outputs, expected)
        query_diff = (
            (outputs["contrastive_queries"] - expected.transformer_decoder_contrastive_queries).abs().max()
        )
        print(
            f"{task} pre_norm={pre_norm} {size}: max |ours - HF| class {class_diff:.3g}, mask {mask_diff:.3g}, "
            f"queries {query_diff:.3g}"
        )
        assert class_diff < 1e-4 and mask_diff < 1e-4 and query_diff < 1e-4
        # inference: attention masks from resized mask features, no earlier full-size masks; same result
        assert (raw["mask_logits"] - outputs["mask_logits"]).abs().max() < 1e-5 and raw["task"] == task
        assert (raw["class_logits"] - outputs["class_logits"]).abs().max() < 1e-5
        assert raw["class_logits"].shape == (2, 8, len(CATEGORIES) + 1)
    # the task token changes the prediction (the conditioning is live)
    with torch.no_grad():
        a, b = ours(images, task="panoptic"), ours(images, task="semantic")
    assert (a["class_logits"] - b["class_logits"]).abs().max() > 1e-3


# 128: stage maps 32, 16, 8 (whole 4x4 windows, shifted) and 4 (one window); 100 x 140: maps 25 x 35,
# 13 x 18, 7 x 9, 4 x 5 -- padded to whole windows before the shift, as HF and the original Swin
@pytest.mark.parametrize("size", [(128, 128), (100, 140)])
def test_whole_hf_model_converts_with_a_timm_swin_backbone(size):
    """HF's Swin weights in timm's Swin: image in, logits out, shifted windows (two blocks per stage)."""
    hf = _tiny_hf_oneformer(depths=(2, 2, 2, 2))
    backbone = swin_backbone_from_hf(hf.config.backbone_config, hf.state_dict(), img_size=size)
    ours = OneFormer(backbone, **oneformer_config_to_kwargs(hf.config)).eval()
    # the backbone was loaded by its own conversion; everything else by this one
    assert all(k.startswith("backbone.") for k in load_hf_oneformer(ours, hf.state_dict()))
    images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    for task in TASKS:
        task_ids = task_token_ids(task)[None]
        with torch.no_grad():
            expected = hf(images, task_ids, output_auxiliary_logits=True)
            outputs = ours.decode(ours.backbone(images), task_ids, aux=True)
        class_diff, mask_diff = _max_diff(outputs, expected)
        print(f"swin {task}: max |ours - HF| class {class_diff:.3g}, mask {mask_diff:.3g}")
        assert class_diff < 1e-4 and mask_diff < 1e-4


def test_save_pretrained_directory_converts(tmp_path):
    hf = _tiny_hf_oneformer(is_training=True)
    hf.save_pretrained(tmp_path)
    ours = oneformer_from_hf_directory(tmp_path, img_size=(64, 64)).eval()
    assert ours.text_mapper is not None
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    task_ids = task_token_ids("instance")[None]
    with torch.no_grad():
        # HF's model built for training wants texts even in evaluation (they do not change its logits)
        expected = hf(images, task_ids, text_inputs=torch.zeros(1, 6, 77, dtype=torch.int64))
        outputs = ours(images, task="instance")
    diff = max(
        (outputs["class_logits"] - expected.class_queries_logits).abs().max().item(),
        (outputs["mask_logits"] - expected.masks_queries_logits).abs().max().item(),
    )
    print(f"save_pretrained directory: max |ours - HF| {diff:.3g}")
    assert diff < 1e-4


def test_hf_conversion_names_every_parameter():
    hf = _tiny_hf_oneformer(is_training=True)
    converted = convert_hf_oneformer(hf.state_dict())
    ours = OneFormer(
        _HFBackbone(hf.model.pixel_level_module.encoder), **oneformer_config_to_kwargs(hf.config)
    )
    assert set(converted) == {k for k in ours.state_dict() if not k.startswith("backbone.")}
    with pytest.raises(KeyError, match="without a counterpart"):
        convert_hf_oneformer({**hf.state_dict(), "model.transformer_module.new_thing.weight": torch.zeros(1)})


def test_text_queries_and_training_losses_match_hf():
    """HF built for training (text mapper + contrastive loss): same text queries from the same
    tokens, and -- same weights, targets and random stream -- the same weighted losses, the
    contrastive one included, for the last layer and every deep-supervision output."""
    hf = _tiny_hf_oneformer(is_training=True, train_num_points=256)
    ours = OneFormer(
        _HFBackbone(hf.model.pixel_level_module.encoder),
        categories=CATEGORIES,
        **oneformer_config_to_kwargs(hf.config),
    )
    load_hf_oneformer(ours, hf.state_dict())
    hf.train()
    ours.train()
    hf.model.pixel_level_module.encoder.eval()  # shared by both: no drop-path draws
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 96, generator=g)
    masks = [torch.rand(3, 64, 96, generator=g) > 0.6, torch.rand(2, 64, 96, generator=g) > 0.3]
    labels = [torch.tensor([0, 3, 2]), torch.tensor([1, 1])]
    targets = [{"labels": lab, "masks": m} for lab, m in zip(labels, masks, strict=True)]
    names = ["panoptic", "panoptic"]
    tokens = ours.text_tokens(targets, names)
    assert tokens.shape == (2, 6, 77)
    with torch.no_grad():
        text_diff = (ours.text_mapper(tokens) - hf.model.text_mapper(tokens)).abs().max().item()
    task_ids = task_token_ids("panoptic")[None].expand(2, -1)
    torch.manual_seed(7)
    out = hf(images, task_ids, text_inputs=tokens, output_auxiliary_logits=True)
    expected = hf.get_loss_dict(
        out.masks_queries_logits,
        out.class_queries_logits,
        out.transformer_decoder_contrastive_queries,
        [m.float() for m in masks],
        labels,
        out.text_queries,
        out.auxiliary_predictions,
        True,
    )
    torch.manual_seed(7)
    losses = ours(images, targets, task=names)
    names_map = {
        "loss_cross_entropy": "loss_ce",
        "loss_mask": "loss_mask",
        "loss_dice": "loss_dice",
        "loss_contrastive": "loss_contrastive",
    }
    renamed = {}
    for key, value in expected.items():
        for hf_name, name in names_map.items():
            if key.startswith(hf_name):
                renamed[name + key[len(hf_name) :]] = value
    assert set(renamed) == set(losses) and len(losses) == 3 * 5 + 1
    diff = max((losses[k] - renamed[k]).abs().item() for k in losses)
    print(
        f"text queries: max |ours - HF| {text_diff:.3g}; training losses: max |ours - HF| {diff:.3g} "
        f"over {len(losses)} terms (contrastive {losses['loss_contrastive'].item():.4f})"
    )
    assert text_diff < 1e-5 and diff < 1e-4


# ----------------------------------------------------------------------------- post-process
def _hf_equal_pair():
    hf = _tiny_hf_oneformer()
    ours = OneFormer(
        _HFBackbone(hf.model.pixel_level_module.encoder),
        categories=CATEGORIES,
        **oneformer_config_to_kwargs(hf.config),
    ).eval()
    load_hf_oneformer(ours, hf.state_dict())
    return hf, ours


def test_post_process_gives_segments_of_the_input_size_for_each_task():
    """Each task's token, then that task's Mask2Former inference at the input's own size; a task
    mismatch between the outputs and the post-processing is refused."""
    _, model = _hf_equal_pair()
    size = (60, 76)  # not a multiple of 4: the masks (15 x 19) are resized to exactly this
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    infer = {
        "semantic": lambda c, m: semantic_inference(c, m, [size] * 2, categories=CATEGORIES),
        "instance": lambda c, m: instance_inference(
            c, m, [size] * 2, categories=CATEGORIES, top_k=32, things_only=True
        ),
        "panoptic": lambda c, m: panoptic_inference(
            c, m, [size] * 2, categories=CATEGORIES, object_mask_thresh=0.0
        ),
    }
    for task in TASKS:
        with torch.no_grad():
            outputs = model(images, task=task)
        # all 32 query-class pairs: the 8 best (the default) may all be stuff for a random model
        options = {"panoptic": {"object_mask_thresh": 0.0}, "instance": {"top_k": 32}}.get(task, {})
        segments = model.post_process(outputs, [size, size], task=task, **options)
        assert len(segments) == 2 and all(isinstance(s, Segments) and s.image_size == size for s in segments)
        if task != "panoptic":  # (a random model's queries may all say "no object")
            assert all(len(s) > 0 for s in segments), task
        expected = infer[task](outputs["class_logits"], outputs["mask_logits"])
        for ours, ref in zip(segments, expected, strict=True):
            assert np.array_equal(ours.category_ids, ref.category_ids)
            assert np.array_equal(ours.masks(), ref.masks()) and np.allclose(ours.scores, ref.scores)
        if task == "instance":  # things only
            assert all(set(s.category_ids.tolist()) <= set(CATEGORIES.thing_ids) for s in segments)
        if task == "semantic":
            assert segments[0].to_semantic().shape == size
    other = "semantic" if outputs["task"] != "semantic" else "panoptic"
    with pytest.raises(ValueError, match="produced for the"):
        model.post_process(outputs, [size, size], task=other)
    with pytest.raises(ValueError, match="does not do"):
        model(images, task="detection")
    # the shared inference path (evaluate, segment, validation) runs each task with its own token
    from omniseg.inference import predict_segments

    assert model.default_task == "panoptic"
    for task in TASKS:
        options = {"panoptic": {"object_mask_thresh": 0.0}, "instance": {"top_k": 32}}.get(task, {})
        with torch.no_grad():
            direct = model.post_process(model(images, task=task), [size, size], task=task, **options)
        shared = predict_segments(model, images, task=task, **options)
        for a, b in zip(direct, shared, strict=True):
            assert np.array_equal(a.category_ids, b.category_ids) and np.array_equal(a.masks(), b.masks())
    # an instance request whose top pairs hold no thing class gives an empty result, not an error
    empty = instance_inference(
        outputs["class_logits"][:, :, :], outputs["mask_logits"], [size] * 2,
        categories=CATEGORIES, top_k=1, things_only=True,
    )  # fmt: skip
    assert all(s.image_size == size for s in empty)


def test_semantic_and_panoptic_match_hf_where_the_procedures_agree():
    """HF's OneFormer post-processing, where it follows the paper's procedure, gives our result:
    semantic at the mask resolution (HF resizes probabilities, the paper logits); panoptic with
    stuff fused, at the mask resolution, on sharp predictions (HF measures a query's own area on
    its score-scaled probabilities and keeps pixels below 0.5 probability; with scores ~1 and
    masks ~0/1 those differences vanish), compared where ours is not void."""
    transformers = pytest.importorskip("transformers")
    hf, ours = _hf_equal_pair()
    processor = transformers.OneFormerImageProcessor()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = ours(images, task="semantic")
        expected = hf(images, task_token_ids("semantic")[None].expand(2, -1))
    mask_size = tuple(outputs["mask_logits"].shape[-2:])
    theirs = processor.post_process_semantic_segmentation(expected)
    mine = ours.post_process(outputs, [mask_size] * 2, task="semantic")
    ids = np.asarray(CATEGORIES.ids)
    for t, m in zip(theirs, mine, strict=True):
        assert np.array_equal(ids[t.numpy()], m.to_semantic())

    with torch.no_grad():
        outputs = ours(images, task="panoptic")
    # a random model's queries mostly say "no object": sharp random classes on its masks instead
    stuff = {i for i, c in enumerate(CATEGORIES) if not c.isthing}
    compared = fused = skipped = 0
    # the model's own masks, and masks tiling the image (each query a blob of a smooth random field)
    q, (h, w) = outputs["mask_logits"].shape[1], mask_size
    field = torch.randn(2, q, 4, 6, generator=torch.Generator().manual_seed(9))
    field = torch.nn.functional.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    tiles = torch.nn.functional.one_hot(field.argmax(1), q).permute(0, 3, 1, 2).float() - 0.5
    for seed in range(6):
        class_logits = torch.randn(
            outputs["class_logits"].shape, generator=torch.Generator().manual_seed(seed)
        )
        mask_logits = outputs["mask_logits"] if seed < 3 else tiles
        sharp = {"class_logits": class_logits * 30, "mask_logits": mask_logits * 30, "task": "panoptic"}
        hf_outputs = type("Out", (), {"class_queries_logits": sharp["class_logits"]})()
        hf_outputs.masks_queries_logits = sharp["mask_logits"]
        theirs = processor.post_process_panoptic_segmentation(
            hf_outputs, threshold=0.8, overlap_mask_area_threshold=0.8, label_ids_to_fuse=stuff
        )
        mine = ours.post_process(sharp, [mask_size] * 2, task="panoptic")
        for t, m in zip(theirs, mine, strict=True):
            hf_map = t["segmentation"].numpy()
            if _hf_ids_collide(t["segments_info"]):
                skipped += 1
                continue
            labels, scores = {}, {}
            for info in t["segments_info"]:  # a fused segment is listed once per query: its first scores it
                labels.setdefault(info["id"], CATEGORIES.ids[info["label_id"]])
                scores.setdefault(info["id"], info["score"])
            fused += len(t["segments_info"]) - len(labels)  # HF lists a fused segment once per query
            ours_of = {
                i: (c, p)
                for i, c, p in zip(
                    m.segment_ids.tolist(), m.category_ids.tolist(), m.scores.tolist(), strict=True
                )
            }
            assert len(labels) == len(ours_of)
            covered = m.id_map > 0
            pairs = set(zip(m.id_map[covered].tolist(), hf_map[covered].tolist(), strict=True))
            assert len(pairs) == len(ours_of) == len({h for _, h in pairs})  # one to one
            for mine_id, hf_id in pairs:
                assert ours_of[mine_id][0] == labels[hf_id]
                assert abs(ours_of[mine_id][1] - scores[hf_id]) < 1e-5
            compared += len(pairs)
    print(
        f"panoptic: {compared} segments ({fused} fused stuff queries) identical to HF's where ours is not "
        f"void; {skipped} of 12 images skipped for HF's id collision"
    )
    assert compared >= 10 and fused >= 1 and skipped <= 6


def _hf_ids_collide(segments_info) -> bool:
    """HF's compute_segments numbers a new segment one above the last id it *used*: after a stuff
    query fused into an earlier segment, the next new segment reuses an existing id (two segments
    under one id). True when that happened in this image."""
    seen, fused = set(), set()
    for info in segments_info:
        if info["was_fused"] and info["label_id"] in fused:
            continue  # a stuff query joining its class's segment
        if info["id"] in seen:
            return True  # a new segment under an existing id
        seen.add(info["id"])
        if info["was_fused"]:
            fused.add(info["label_id"])
    return False


# --------------------------------------------------------------------------------- training
TINY = dict(
    hidden_dim=64,
    num_queries=10,
    num_heads=2,
    decoder_layers=2,
    decoder_ffn_dim=64,
    conv_dim=64,
    mask_dim=64,
    encoder_layers=1,
    encoder_heads=2,
    encoder_ffn_dim=64,
    num_points=256,
    query_dec_layers=1,
    text_width=64,
    text_layers=1,
    n_ctx=4,
)


def _panoptic_segments(h: int, w: int, shift: int) -> Segments:
    id_map = np.zeros((h, w), dtype=np.int32)
    id_map[: h // 2] = 1  # sky
    id_map[h // 2 :] = 2  # road
    id_map[8 + shift : 24 + shift, 8:30] = 3  # car
    id_map[30:56, 40 + shift : 52 + shift] = 4  # person
    id_map[40:60, 4:14] = 5  # another person
    id_map[4:10, 50:60] = 6  # a crowd of people: not a target
    return Segments(
        (h, w),
        [101, 100, 3, 1, 1, 1],
        categories=CATEGORIES,
        iscrowd=[False, False, False, False, False, True],
        segment_ids=[1, 2, 3, 4, 5, 6],
        id_map=id_map,
    )


def _tiny_model(**options):
    torch.manual_seed(0)
    return build_model({"name": "oneformer", "categories": CATEGORIES.to_dicts(), **TINY, **options})


def test_task_targets_from_one_panoptic_annotation():
    from omniseg.models.mask2former import encode_mask_targets

    target = finalize_target(training_target(_panoptic_segments(64, 64, 0), CATEGORIES))
    (encoded,) = encode_mask_targets([target], CATEGORIES)  # crowd dropped, labels = table indices
    is_thing = torch.tensor([True, True, False, False])
    panoptic = task_targets(encoded, "panoptic", is_thing)
    assert panoptic["labels"].tolist() == [3, 2, 1, 0, 0]
    instance = task_targets(encoded, "instance", is_thing)
    assert instance["labels"].tolist() == [1, 0, 0]  # car, person, person: things only
    assert torch.equal(instance["masks"], encoded["masks"][2:])
    semantic = task_targets(encoded, "semantic", is_thing)
    assert semantic["labels"].tolist() == [0, 1, 2, 3]  # one per class present
    people = encoded["masks"][3] | encoded["masks"][4]
    assert torch.equal(semantic["masks"][0], people)  # the two people merged into one mask
    assert torch.equal(semantic["masks"][3], encoded["masks"][0])  # sky
    assert semantic["masks"].dtype == torch.bool

    model = _tiny_model()
    tokens = model.text_tokens([instance, semantic], ["instance", "semantic"])
    assert tokens.shape == (2, 6, 77)
    table = model.class_text_ids()
    from omniseg.models.layers.clip_tokenizer import default_tokenizer

    tok = default_tokenizer()
    assert torch.equal(tokens[0, :3], tok.tokenize(["a photo with a person"] * 2 + ["a photo with a car"]))
    assert torch.equal(tokens[0, 3:], tok.tokenize([task_texts("instance")] * 3))
    assert torch.equal(tokens[1, :4], table[:4]) and torch.equal(
        tokens[1, 4:], tok.tokenize(["a semantic photo"] * 2)
    )


def test_each_image_draws_its_task_from_torch_rng():
    model = _tiny_model().train()
    drawn = []
    model.training_losses = lambda images, targets, names: drawn.append(list(names)) or {}
    images, targets = torch.zeros(30, 3, 8, 8), [{}] * 30
    torch.manual_seed(5)
    model(images, targets)
    torch.manual_seed(5)
    model(images, targets)
    assert drawn[0] == drawn[1]  # seeded by torch's RNG
    counts = {t: drawn[0].count(t) for t in TASKS}
    assert all(n > 0 for n in counts.values()), counts


def test_one_joint_training_step_reaches_every_parameter():
    model = _tiny_model().train()
    assert json.loads(json.dumps(model.config))["name"] == "oneformer"
    h, w = 64, 64
    targets = [finalize_target(training_target(_panoptic_segments(h, w, s), CATEGORIES)) for s in (0, 4, 2)]
    images = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    losses = model(images, targets, task=["panoptic", "instance", "semantic"])
    expected = {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")} | {
        "loss_contrastive"
    }
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    print({k: round(v.item(), 4) for k, v in losses.items()})
    sum(losses.values()).backward()
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert not [n for n, p in trainable.items() if p.grad is None], "parameters outside the graph"
    # as in Mask2Former: at the reference initialisation deformable attention ignores its query, so
    # the encoder's level embedding has an exact zero gradient at the first step
    zero = [n for n, p in trainable.items() if not p.grad.abs().sum() > 0]
    assert zero == ["pixel_decoder.level_embed"], f"parameters with a zero gradient: {zero}"
    assert model.logit_scale.grad.abs() > 0 and model.text_mapper.prompt_ctx.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    # the drawn tasks (no task given) train too
    model.zero_grad()
    torch.manual_seed(2)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


# --------------------------------------------------------------------------- inference only
class _Forbidden(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the text encoder ran")


def test_text_encoder_is_not_run_at_inference():
    model = _tiny_model().eval()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(images, task="instance")
        model.text_mapper = _Forbidden()
        mocked = model(images, task="instance")
        model.text_mapper = None  # or removed altogether
        removed = model(images, task="instance")
    assert torch.equal(reference["class_logits"], mocked["class_logits"])
    assert torch.equal(reference["mask_logits"], removed["mask_logits"])
    segments = model.post_process(removed, [(64, 64)])
    assert segments[0].image_size == (64, 64)
    # ... while training does use it
    model.text_mapper = _Forbidden()
    model.train()
    target = finalize_target(training_target(_panoptic_segments(64, 64, 0), CATEGORIES))
    with pytest.raises(AssertionError, match="text encoder ran"):
        model(images, [target])
    # a model built without a text side has no such parameters at all
    bare = _tiny_model(text_encoder=False)
    assert bare.text_mapper is None and not any(k.startswith("text_mapper") for k in bare.state_dict())
