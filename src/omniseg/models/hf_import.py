"""Hugging Face ``Mask2FormerForUniversalSegmentation`` weights -> :class:`~omniseg.models.mask2former.Mask2Former`.

The pixel decoder, transformer decoder and class / mask heads are renamed one to one, except
that HF's decoder self-attention keeps separate ``q/k/v`` projections where ours
(``nn.MultiheadAttention``, as in the reference implementation) has one fused ``in_proj``.
The backbone (``model.pixel_level_module.encoder.*``) is converted separately: HF's Swin to
:class:`~omniseg.models.backbones.swin.SwinBackbone` (timm's ``SwinTransformer`` + per-stage norms)
by :func:`convert_hf_swin` / :func:`swin_backbone_from_hf`, q/k/v fused into timm's ``qkv`` and
each patch merging moved from the end of its stage (HF) to the start of the next (timm).

Hugging Face ``OneFormerForUniversalSegmentation`` converts the same way into
:class:`~omniseg.models.oneformer.OneFormer` (:func:`convert_hf_oneformer`, :func:`load_hf_oneformer`,
:func:`oneformer_from_hf_directory`): the same pixel decoder names, its decoder, query transformer,
task MLP and (when HF built one for training) text mapper renamed one to one.

Nothing here downloads: state dicts come from the caller or from a local ``save_pretrained``
directory (:func:`load_hf_directory`; :func:`mask2former_from_hf_directory` builds the whole model).
Both HF key layouts are read: the one of a model in memory (transformers 5) and the one of its
checkpoint files (BERT-style Swin names). ``transformers`` is not needed for the conversion.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "HF_BACKBONE_PREFIX",
    "convert_hf_mask2former",
    "convert_hf_swin",
    "hf_config_to_kwargs",
    "load_hf_directory",
    "load_hf_mask2former",
    "convert_hf_oneformer",
    "load_hf_oneformer",
    "mask2former_from_hf_directory",
    "oneformer_config_to_kwargs",
    "oneformer_from_hf_directory",
    "read_hf_directory",
    "swin_backbone_from_hf",
]

HF_BACKBONE_PREFIX = "model.pixel_level_module.encoder."
_PIXEL = "model.pixel_level_module.decoder."
_TRANSFORMER = "model.transformer_module."

# (HF pattern, our replacement), tried in order; the first match renames the key
_RENAMES: list[tuple[str, str]] = [
    (rf"^{_PIXEL}level_embed$", "pixel_decoder.level_embed"),
    (rf"^{_PIXEL}input_projections\.(.*)$", r"pixel_decoder.input_projections.\1"),
    (rf"^{_PIXEL}encoder\.layers\.(.*)$", r"pixel_decoder.layers.\1"),
    (rf"^{_PIXEL}mask_projection\.(.*)$", r"pixel_decoder.mask_projection.\1"),
    (rf"^{_PIXEL}adapter_(\d+)\.(.*)$", r"pixel_decoder.lateral_convs.<\1>.\2"),
    (rf"^{_PIXEL}layer_(\d+)\.(.*)$", r"pixel_decoder.output_convs.<\1>.\2"),
    (rf"^{_TRANSFORMER}queries_embedder\.weight$", "transformer_decoder.query_embed.weight"),
    (rf"^{_TRANSFORMER}queries_features\.weight$", "transformer_decoder.query_feat.weight"),
    (rf"^{_TRANSFORMER}level_embed\.weight$", "transformer_decoder.level_embed.weight"),
    (rf"^{_TRANSFORMER}input_projections\.(.*)$", r"transformer_decoder.input_projections.\1"),
    (rf"^{_TRANSFORMER}decoder\.layers\.(.*)$", r"transformer_decoder.layers.\1"),
    (rf"^{_TRANSFORMER}decoder\.layernorm\.(.*)$", r"transformer_decoder.layernorm.\1"),
    (
        rf"^{_TRANSFORMER}decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(.*)$",
        r"transformer_decoder.mask_embed.layers.\1.\2",
    ),
    (r"^class_predictor\.(.*)$", r"transformer_decoder.class_embed.\1"),
]
_SKIPPED = (r"^criterion\.",)
_QKV = re.compile(r"^(transformer_decoder\.layers\.\d+\.self_attn)\.([qkv])_proj\.(weight|bias)$")


def _one_based_to_zero_based(key: str) -> str:
    # HF numbers its FPN adapters adapter_1, adapter_2, ... (our lists start at 0)
    return re.sub(r"<(\d+)>", lambda m: str(int(m.group(1)) - 1), key)


def convert_hf_mask2former(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our ``state_dict`` entries (all but ``backbone.*``) from a HF Mask2Former state dict.

    Raises ``KeyError`` naming any key outside the backbone that has no counterpart, so a layout
    change in transformers cannot be half-imported silently.
    """
    converted: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in hf_state.items():
        if key.startswith(HF_BACKBONE_PREFIX) or any(re.match(p, key) for p in _SKIPPED):
            continue
        for pattern, replacement in _RENAMES:
            if re.match(pattern, key):
                ours = _one_based_to_zero_based(re.sub(pattern, replacement, key))
                break
        else:
            unknown.append(key)
            continue
        match = _QKV.match(ours)
        if match:  # gathered, fused below
            qkv.setdefault(f"{match.group(1)}.in_proj_{match.group(3)}", {})[match.group(2)] = value
        else:
            converted[ours] = value
    if unknown:
        raise KeyError(
            f"HF Mask2Former keys without a counterpart: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    for key, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"{key}: HF state dict has only the {sorted(parts)} projections")
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return converted


# Mask2FormerConfig's defaults for the entries a config.json may leave out
_HF_DEFAULTS: dict[str, Any] = {
    "pre_norm": False,
    "enforce_input_projection": False,
    "dropout": 0.0,
    "class_weight": 2.0,
    "mask_weight": 5.0,
    "dice_weight": 5.0,
    "no_object_weight": 0.1,
    "train_num_points": 12544,
    "oversample_ratio": 3.0,
    "importance_sample_ratio": 0.75,
}


def hf_config_to_kwargs(config: Any) -> dict[str, Any]:
    """:class:`~omniseg.models.mask2former.Mask2Former` keyword arguments (``num_classes`` included)
    equivalent to a HF ``Mask2FormerConfig`` (an object or its ``to_dict()`` form)."""
    c = config if isinstance(config, Mapping) else config.to_dict()
    c = {**_HF_DEFAULTS, **c}  # config.json files of older checkpoints leave some out
    num_labels = c.get("num_labels") or len(c.get("id2label") or {})
    return {
        "num_classes": int(num_labels),
        "hidden_dim": c["hidden_dim"],
        "num_queries": c["num_queries"],
        "num_heads": c["num_attention_heads"],
        "decoder_layers": c["decoder_layers"] - 1,  # HF counts the prediction from the initial queries
        "decoder_ffn_dim": c["dim_feedforward"],
        "pre_norm": c["pre_norm"],
        "enforce_input_projection": c["enforce_input_projection"],
        "conv_dim": c["feature_size"],
        "mask_dim": c["mask_feature_size"],
        "encoder_layers": c["encoder_layers"],
        "encoder_heads": c["num_attention_heads"],
        "encoder_points": 4,
        "encoder_ffn_dim": c["encoder_feedforward_dim"],
        "dropout": float(c["dropout"]),
        "class_weight": c["class_weight"],
        "mask_weight": c["mask_weight"],
        "dice_weight": c["dice_weight"],
        "no_object_weight": c["no_object_weight"],
        "num_points": c["train_num_points"],
        "oversample_ratio": c["oversample_ratio"],
        "importance_sample_ratio": c["importance_sample_ratio"],
    }


def load_hf_mask2former(model: nn.Module, hf_state: Mapping[str, Tensor]) -> list[str]:
    """Load a HF Mask2Former state dict into ``model`` (all but its backbone, strictly).

    Returns the model's keys left as they were: its backbone's.
    """
    converted = convert_hf_mask2former(hf_state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise KeyError(f"converted keys the model does not have: {unexpected[:10]}")
    not_backbone = [k for k in missing if not k.startswith("backbone.")]
    if not_backbone:
        raise KeyError(f"model keys the HF state dict does not provide: {not_backbone[:10]}")
    return missing


def load_hf_directory(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(Mask2Former kwargs, HF state dict)`` from a local ``save_pretrained`` directory
    (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``); never a hub download."""
    config, state = read_hf_directory(path)
    return hf_config_to_kwargs(config), state


def read_hf_directory(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json as a dict, HF state dict)`` of a local ``save_pretrained`` directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path} (a save_pretrained directory is expected)")
    config = json.loads(config_file.read_text())
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"), device="cpu")
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(str(path / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    return config, state


# ------------------------------------------------------------------------------- Swin backbone
_B = r"^(?:swin\.)?encoder\.layers\.(\d+)\.blocks\.(\d+)\."  # a block, in either layout
_SWIN_RENAMES: list[tuple[str, str]] = [
    (r"^(?:swin\.)?embeddings\.patch_embeddings\.projection\.(.*)$", r"body.patch_embed.proj.\1"),
    (r"^(?:swin\.)?embeddings\.norm\.(.*)$", r"body.patch_embed.norm.\1"),
    (_B + r"layernorm_before\.(.*)$", r"body.layers_\1.blocks.\2.norm1.\3"),
    (_B + r"layernorm_after\.(.*)$", r"body.layers_\1.blocks.\2.norm2.\3"),
    # transformers 5 in memory: mlp.fc1 / mlp.fc2, attention.{q,k,v,o}_proj
    (_B + r"mlp\.(.*)$", r"body.layers_\1.blocks.\2.mlp.\3"),
    (_B + r"attention\.o_proj\.(.*)$", r"body.layers_\1.blocks.\2.attn.proj.\3"),
    (_B + r"attention\.([qkv])_proj\.(weight|bias)$", r"body.layers_\1.blocks.\2.attn.qkv.\4#\3"),
    (
        _B + r"attention\.relative_position_bias\.relative_position_bias_table$",
        r"body.layers_\1.blocks.\2.attn.relative_position_bias_table",
    ),
    # the checkpoint layout (hub files, save_pretrained): BERT-style names
    (_B + r"intermediate\.dense\.(.*)$", r"body.layers_\1.blocks.\2.mlp.fc1.\3"),
    (_B + r"output\.dense\.(.*)$", r"body.layers_\1.blocks.\2.mlp.fc2.\3"),
    (_B + r"attention\.output\.dense\.(.*)$", r"body.layers_\1.blocks.\2.attn.proj.\3"),
    (_B + r"attention\.self\.(q)uery\.(weight|bias)$", r"body.layers_\1.blocks.\2.attn.qkv.\4#\3"),
    (_B + r"attention\.self\.(k)ey\.(weight|bias)$", r"body.layers_\1.blocks.\2.attn.qkv.\4#\3"),
    (_B + r"attention\.self\.(v)alue\.(weight|bias)$", r"body.layers_\1.blocks.\2.attn.qkv.\4#\3"),
    (
        _B + r"attention\.self\.relative_position_bias_table$",
        r"body.layers_\1.blocks.\2.attn.relative_position_bias_table",
    ),
    # HF merges patches at the end of stage i, timm at the start of stage i + 1
    (r"^(?:swin\.)?encoder\.layers\.(\d+)\.downsample\.(.*)$", r"body.layers_<+\1>.downsample.\2"),
    (r"^hidden_states_norms\.stage(\d+)\.(.*)$", r"norms.<\1>.\2"),
]
# buffers rebuilt by timm, and the classification norm a backbone does not use
_SWIN_SKIPPED = (r"relative_position_index$", r"^(?:swin\.)?layernorm\.", r"attn_mask$")


def convert_hf_swin(hf_state: Mapping[str, Tensor], *, prefix: str = HF_BACKBONE_PREFIX) -> dict[str, Tensor]:
    """:class:`~omniseg.models.backbones.swin.SwinBackbone` ``state_dict`` entries from the keys of
    a HF ``SwinBackbone`` under ``prefix`` (Mask2Former's backbone by default; ``""`` for a bare
    ``SwinBackbone`` state dict). Unknown keys raise ``KeyError``."""
    converted: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in hf_state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if any(re.search(p, key) for p in _SWIN_SKIPPED):
            continue
        for pattern, replacement in _SWIN_RENAMES:
            if re.match(pattern, key):
                ours = re.sub(pattern, replacement, key)
                break
        else:
            unknown.append(key)
            continue
        ours = re.sub(r"<\+(\d+)>", lambda m: str(int(m.group(1)) + 1), ours)
        ours = _one_based_to_zero_based(ours)
        if "#" in ours:
            name, part = ours.split("#")
            qkv.setdefault(name, {})[part] = value
        else:
            converted[ours] = value
    if unknown:
        raise KeyError(f"HF Swin keys without a counterpart: {unknown[:10]}")
    for key, parts in qkv.items():
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return converted


def swin_backbone_from_hf(
    backbone_config: Any, hf_state: Mapping[str, Tensor] | None = None, *, img_size: int | tuple[int, int]
) -> nn.Module:
    """A :class:`~omniseg.models.backbones.swin.SwinBackbone` of a HF ``SwinConfig`` (object or dict)
    built for inputs of ``img_size``, loaded (strictly) from ``hf_state`` when given."""
    from omniseg.models.backbones.swin import SwinBackbone

    c = backbone_config if isinstance(backbone_config, Mapping) else backbone_config.to_dict()
    if c.get("use_absolute_embeddings"):
        raise ValueError("Swin with absolute position embeddings is not supported")
    backbone = SwinBackbone(
        img_size=img_size,
        patch_size=c["patch_size"],
        embed_dim=c["embed_dim"],
        depths=tuple(c["depths"]),
        num_heads=tuple(c["num_heads"]),
        window_size=c["window_size"],
        mlp_ratio=c["mlp_ratio"],
        qkv_bias=c["qkv_bias"],
    )
    if hf_state is not None:
        backbone.load_state_dict(convert_hf_swin(hf_state))
    return backbone


def mask2former_from_hf_directory(
    path: str | Path, *, img_size: int | tuple[int, int], categories: Any = None
) -> nn.Module:
    """The whole HF Mask2Former of a local ``save_pretrained`` directory (Swin backbone) as our
    :class:`~omniseg.models.mask2former.Mask2Former`, its backbone built for inputs of ``img_size``
    (see :mod:`omniseg.models.backbones.swin`). ``categories`` (a ``CategoryTable``) must list the
    checkpoint's classes in its label order."""
    from omniseg.models.mask2former import Mask2Former

    kwargs, state = load_hf_directory(path)
    backbone_config = json.loads((Path(path) / "config.json").read_text()).get("backbone_config") or {}
    if backbone_config.get("model_type") != "swin":
        raise ValueError(f"{path}: only Swin backbones convert, not {backbone_config.get('model_type')!r}")
    model = Mask2Former(
        swin_backbone_from_hf(backbone_config, state, img_size=img_size), categories=categories, **kwargs
    )
    load_hf_mask2former(model, state)
    return model


# ----------------------------------------------------------------------------------- OneFormer
_OF = "model.transformer_module."
_OF_LAYER = rf"^{_OF}decoder\.layers\.(\d+)\."
# HF OneFormer -> omniseg.models.oneformer.OneFormer; the pixel decoder is named as in Mask2Former
_ONEFORMER_RENAMES: list[tuple[str, str]] = [
    *[(p, r) for p, r in _RENAMES if p.startswith(f"^{_PIXEL}")],
    (rf"^{_OF}queries_embedder\.weight$", "transformer_decoder.query_embed.weight"),
    (rf"^{_OF}level_embed\.weight$", "transformer_decoder.level_embed.weight"),
    (rf"^{_OF}decoder\.decoder_norm\.(.*)$", r"transformer_decoder.layernorm.\1"),
    (rf"^{_OF}decoder\.class_embed\.(.*)$", r"transformer_decoder.class_embed.\1"),
    (rf"^{_OF}decoder\.mask_embed\.layers\.(\d+)\.0\.(.*)$", r"transformer_decoder.mask_embed.layers.\1.\2"),
    (_OF_LAYER + r"cross_attn\.multihead_attn\.(.*)$", r"transformer_decoder.layers.\1.cross_attn.\2"),
    (_OF_LAYER + r"cross_attn\.norm\.(.*)$", r"transformer_decoder.layers.\1.cross_attn_layer_norm.\2"),
    (_OF_LAYER + r"self_attn\.self_attn\.(.*)$", r"transformer_decoder.layers.\1.self_attn.\2"),
    (_OF_LAYER + r"self_attn\.norm\.(.*)$", r"transformer_decoder.layers.\1.self_attn_layer_norm.\2"),
    (_OF_LAYER + r"ffn\.linear1\.(.*)$", r"transformer_decoder.layers.\1.fc1.\2"),
    (_OF_LAYER + r"ffn\.linear2\.(.*)$", r"transformer_decoder.layers.\1.fc2.\2"),
    (_OF_LAYER + r"ffn\.norm\.(.*)$", r"transformer_decoder.layers.\1.final_layer_norm.\2"),
    (rf"^{_OF}decoder\.query_transformer\.decoder\.layers\.(.*)$", r"query_transformer.layers.\1"),
    (rf"^{_OF}decoder\.query_transformer\.decoder\.norm\.(.*)$", r"query_transformer.norm.\1"),
    (rf"^{_OF}decoder\.query_input_projection\.(.*)$", r"query_transformer.input_projection.\1"),
    (r"^model\.task_encoder\.task_mlp\.layers\.(\d+)\.0\.(.*)$", r"task_mlp.layers.\1.\2"),
    (r"^model\.text_mapper\.text_encoder\.(.*)$", r"text_mapper.text_encoder.\1"),
    (
        r"^model\.text_mapper\.text_projector\.layers\.(\d+)\.0\.(.*)$",
        r"text_mapper.text_projector.layers.\1.\2",
    ),
    (r"^model\.text_mapper\.prompt_ctx\.weight$", "text_mapper.prompt_ctx.weight"),
    (r"^criterion\.logit_scale$", "logit_scale"),
]
_ONEFORMER_SKIPPED = (r"^criterion\.empty_weight$",)  # rebuilt from no_object_weight


def convert_hf_oneformer(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our :class:`~omniseg.models.oneformer.OneFormer` ``state_dict`` entries (all but
    ``backbone.*``) from a HF ``OneFormerForUniversalSegmentation`` state dict: renamed one to one,
    the decoder self-attention's ``q/k/v`` fused into ``nn.MultiheadAttention``'s ``in_proj``.
    Keys outside the backbone without a counterpart raise ``KeyError``."""
    converted: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in hf_state.items():
        if key.startswith(HF_BACKBONE_PREFIX) or any(re.match(p, key) for p in _ONEFORMER_SKIPPED):
            continue
        for pattern, replacement in _ONEFORMER_RENAMES:
            if re.match(pattern, key):
                ours = _one_based_to_zero_based(re.sub(pattern, replacement, key))
                break
        else:
            unknown.append(key)
            continue
        match = _QKV.match(ours)
        if match:
            qkv.setdefault(f"{match.group(1)}.in_proj_{match.group(3)}", {})[match.group(2)] = value
        else:
            converted[ours] = value
    if unknown:
        raise KeyError(
            f"HF OneFormer keys without a counterpart: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    for key, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"{key}: HF state dict has only the {sorted(parts)} projections")
        converted[key] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return converted


# OneFormerConfig's defaults for the entries a config.json may leave out
_HF_ONEFORMER_DEFAULTS: dict[str, Any] = {
    "pre_norm": False,
    "enforce_input_proj": False,
    "dropout": 0.1,
    "class_weight": 2.0,
    "mask_weight": 5.0,
    "dice_weight": 5.0,
    "no_object_weight": 0.1,
    "contrastive_weight": 0.5,
    "contrastive_temperature": 0.07,
    "train_num_points": 12544,
    "oversample_ratio": 3.0,
    "importance_sample_ratio": 0.75,
    "task_seq_len": 77,
    "text_encoder_width": 256,
    "text_encoder_context_length": 77,
    "text_encoder_num_layers": 6,
    "text_encoder_vocab_size": 49408,
    "text_encoder_proj_layers": 2,
    "text_encoder_n_ctx": 16,
    "use_task_norm": True,
    "query_dec_layers": 2,
    "common_stride": 4,
    "layer_norm_eps": 1e-5,
    "is_training": False,
}


def oneformer_config_to_kwargs(config: Any) -> dict[str, Any]:
    """:class:`~omniseg.models.oneformer.OneFormer` keyword arguments (``num_classes`` included)
    equivalent to a HF ``OneFormerConfig`` (object or ``to_dict()`` form).

    The text side is built only when HF's is (``is_training``), and without CLIP's causal mask,
    which HF's text encoder builds but never applies. HF registers no weights for the decoder's
    input projections (a plain list), so configurations that need them cannot be converted.
    """
    c = config if isinstance(config, Mapping) else config.to_dict()
    c = {**_HF_ONEFORMER_DEFAULTS, **c}
    if c["conv_dim"] != c["hidden_dim"] or c["enforce_input_proj"]:
        raise ValueError(
            "HF OneFormer keeps its decoder input projections out of the state dict: "
            "only conv_dim == hidden_dim without enforce_input_proj converts"
        )
    if c["text_encoder_vocab_size"] != 49408 or c["layer_norm_eps"] != 1e-5 or c["common_stride"] != 4:
        raise ValueError(
            "only CLIP's 49,408-token vocabulary, LayerNorm eps 1e-5 and common stride 4 convert"
        )
    num_labels = c.get("num_labels") or len(c.get("id2label") or {})
    return {
        "num_classes": int(num_labels),
        "hidden_dim": c["hidden_dim"],
        "num_queries": c["num_queries"],
        "num_heads": c["num_attention_heads"],
        "decoder_layers": c["decoder_layers"] - 1,  # HF counts the prediction from the initial queries
        "decoder_ffn_dim": c["dim_feedforward"],
        "pre_norm": c["pre_norm"],
        "conv_dim": c["conv_dim"],
        "mask_dim": c["mask_dim"],
        "encoder_layers": c["encoder_layers"],
        "encoder_heads": c["num_attention_heads"],
        "encoder_points": 4,
        "encoder_ffn_dim": c["encoder_feedforward_dim"],
        "dropout": float(c["dropout"]),
        "class_weight": c["class_weight"],
        "mask_weight": c["mask_weight"],
        "dice_weight": c["dice_weight"],
        "no_object_weight": c["no_object_weight"],
        "num_points": c["train_num_points"],
        "oversample_ratio": c["oversample_ratio"],
        "importance_sample_ratio": c["importance_sample_ratio"],
        "task_seq_len": c["task_seq_len"],
        "query_dec_layers": c["query_dec_layers"],
        "use_task_norm": c["use_task_norm"],
        "text_encoder": bool(c["is_training"]),
        "text_width": c["text_encoder_width"],
        "text_layers": c["text_encoder_num_layers"],
        "text_context_length": c["text_encoder_context_length"],
        "text_proj_layers": c["text_encoder_proj_layers"],
        "n_ctx": c["text_encoder_n_ctx"],
        "text_causal_mask": False,
        "contrastive_weight": c["contrastive_weight"],
        "contrastive_temperature": c["contrastive_temperature"],
    }


def load_hf_oneformer(model: nn.Module, hf_state: Mapping[str, Tensor]) -> list[str]:
    """Load a HF OneFormer state dict into ``model`` (all but its backbone, strictly); returns the
    model's keys left as they were: its backbone's (and its text side's, when HF had none)."""
    converted = convert_hf_oneformer(hf_state)
    if getattr(model, "text_mapper", None) is None:  # HF keeps its temperature without a text side too
        converted.pop("logit_scale", None)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise KeyError(f"converted keys the model does not have: {unexpected[:10]}")
    has_text = any(k.startswith("text_mapper.") for k in converted)
    allowed = ("backbone.",) if has_text else ("backbone.", "text_mapper.", "logit_scale")
    left = [k for k in missing if not k.startswith(allowed)]
    if left:
        raise KeyError(f"model keys the HF state dict does not provide: {left[:10]}")
    return missing


def oneformer_from_hf_directory(
    path: str | Path, *, img_size: int | tuple[int, int], categories: Any = None
) -> nn.Module:
    """The whole HF OneFormer of a local ``save_pretrained`` directory (Swin backbone) as our
    :class:`~omniseg.models.oneformer.OneFormer`, its backbone built for inputs of ``img_size``.
    ``categories`` (a ``CategoryTable``) must list the checkpoint's classes in its label order."""
    from omniseg.models.oneformer import OneFormer

    config, state = read_hf_directory(path)
    backbone_config = config.get("backbone_config") or {}
    if backbone_config.get("model_type") != "swin":
        raise ValueError(f"{path}: only Swin backbones convert, not {backbone_config.get('model_type')!r}")
    model = OneFormer(
        swin_backbone_from_hf(backbone_config, state, img_size=img_size),
        categories=categories,
        **oneformer_config_to_kwargs(config),
    )
    load_hf_oneformer(model, state)
    return model
