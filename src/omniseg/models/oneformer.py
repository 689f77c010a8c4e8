"""OneFormer (Jain et al. 2023): one task-conditioned Mask2Former for all three tasks.

    backbone -> MSDeformAttnPixelDecoder -> mask features (1/4) + F32, F16, F8
    "the task is {task}" -> CLIP BPE ids (77) -> task MLP -> task token
    task token x (Q - 1) -> query transformer over the mask features -> object queries
    [object queries, task token] -> masked-attention transformer decoder -> class + mask per query

The pixel decoder and the masked-attention decoder are Mask2Former's
(:mod:`omniseg.models.layers.mask2former_decoder`); the queries are not learnt but derived from
the task (:class:`~omniseg.models.layers.oneformer_heads.QueryTransformer`). One trained model
serves each task with that task's token: ``model(images, task="semantic")``, then
``post_process(outputs, sizes, task="semantic")`` -- Mask2Former's inference
(:mod:`omniseg.models.layers.mask_classification`), at each image's resolution.

Training is task-conditioned joint training: every image of a batch draws its task uniformly
(torch's RNG), and its targets come from its panoptic annotation -- panoptic: every non-crowd
segment; instance: the thing segments; semantic: one mask per class present (a class's things
and stuff merged). The losses are Mask2Former's (matching, class / BCE / dice weighted 2 / 5 / 5,
no-object 0.1, deep supervision) plus the query-text contrastive loss (weight 0.5): per image,
"a photo with a {class}" for each target segment, padded with the task's own text to
``num_queries - n_ctx`` texts, encoded by a small CLIP-style text transformer plus ``n_ctx``
learnable context tokens; each image's queries (before the decoder) and its text queries, each
flattened and normalised, are contrasted against the other images' with a learnable temperature
(initially 0.07), both directions summed. The text side runs only in training.

``omniseg.models.hf_import`` loads Hugging Face ``OneFormerForUniversalSegmentation`` weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.inference import validate_task
from omniseg.models import register_model
from omniseg.models.backbones import Backbone, build_backbone
from omniseg.models.layers.detection import as_category_table
from omniseg.models.layers.mask2former_decoder import MLP, MaskedAttentionDecoder
from omniseg.models.layers.oneformer_heads import QueryTransformer, TextMapper
from omniseg.models.mask2former import Mask2Former, encode_mask_targets
from omniseg.structures import CategoryTable, Segments

__all__ = [
    "ONEFORMER_TASKS",
    "TASK_TEXT_IDS",
    "OneFormer",
    "oneformer",
    "task_targets",
    "task_texts",
    "task_token_ids",
]

ONEFORMER_TASKS = ("panoptic", "instance", "semantic")
# CLIP BPE ids of "the task is {task}" (between start 49406 and end 49407 of text): constants, so
# inference needs no vocabulary; tests/test_oneformer.py checks them against the tokeniser
TASK_TEXT_IDS: dict[str, tuple[int, ...]] = {
    "panoptic": (518, 10549, 533, 1072, 24755),
    "instance": (518, 10549, 533, 34572),
    "semantic": (518, 10549, 533, 29119, 1550),
}
_SOT, _EOT = 49406, 49407


def task_token_ids(task: str, length: int = 77) -> Tensor:
    """``(length,)`` int64: the tokenised "the task is {task}", zero padded."""
    ids = torch.zeros(length, dtype=torch.int64)
    tokens = (_SOT, *TASK_TEXT_IDS[task], _EOT)
    ids[: len(tokens)] = torch.tensor(tokens)
    return ids


def task_texts(task: str) -> str:
    """The text that pads a ``task`` image's text list (the reference's wording, "an panoptic" included)."""
    return {"semantic": "a semantic photo", "instance": "an instance photo", "panoptic": "an panoptic photo"}[
        task
    ]


def task_targets(target: Mapping[str, Tensor], task: str, is_thing: Tensor) -> dict[str, Tensor]:
    """One image's ``{"labels", "masks"}`` (crowd already dropped) as the target of ``task``:
    panoptic unchanged, instance the thing segments, semantic one merged mask per class present
    (class order ascending). ``is_thing (C,)`` bool by class index."""
    labels, masks = target["labels"], target["masks"]
    if task == "panoptic":
        return {"labels": labels, "masks": masks}
    if task == "instance":
        keep = is_thing.to(labels.device)[labels]
        return {"labels": labels[keep], "masks": masks[keep]}
    if task != "semantic":
        raise ValueError(f"unknown OneFormer task {task!r}")
    classes, segment_class = labels.unique(return_inverse=True)
    onehot = F.one_hot(segment_class, len(classes)).to(torch.float32)  # (K, U)
    merged = torch.einsum("ku,khw->uhw", onehot, masks.to(torch.float32)) > 0
    return {"labels": classes, "masks": merged}


class OneFormer(Mask2Former):
    """Backbone + Mask2Former's pixel decoder + task conditioning + its masked-attention decoder.

    Mask2Former's arguments mean the same here (``decoder_layers`` counts transformer layers:
    Hugging Face's ``decoder_layers`` minus one). OneFormer's own: ``task_seq_len`` (task-text
    length), ``query_dec_layers`` (query transformer), ``use_task_norm``; the text side
    ``text_encoder`` (False: built without it, inference only), ``text_width``, ``text_layers``,
    ``text_context_length``, ``text_proj_layers``, ``n_ctx``, ``text_causal_mask``,
    ``contrastive_weight``, ``contrastive_temperature``. Defaults are the paper's (COCO/ADE:
    150 queries, 10 predictions, dropout 0.1 in the pixel decoder and query transformer).
    ``top_k`` (instance results) defaults to the number of queries, as in the reference.
    """

    tasks: tuple[str, ...] = ONEFORMER_TASKS
    task_conditioned = True  # outputs depend on the task token: omniseg.inference passes the task

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        categories: CategoryTable | None = None,
        hidden_dim: int = 256,
        num_queries: int = 150,
        num_heads: int = 8,
        decoder_layers: int = 9,
        decoder_ffn_dim: int = 2048,
        pre_norm: bool = False,
        enforce_input_projection: bool = False,
        conv_dim: int = 256,
        mask_dim: int = 256,
        dropout: float = 0.1,
        task_seq_len: int = 77,
        query_dec_layers: int = 2,
        use_task_norm: bool = True,
        text_encoder: bool = True,
        text_width: int = 256,
        text_layers: int = 6,
        text_context_length: int = 77,
        text_proj_layers: int = 2,
        n_ctx: int = 16,
        text_causal_mask: bool = True,
        contrastive_weight: float = 0.5,
        contrastive_temperature: float = 0.07,
        top_k: int | None = None,
        **mask2former_kwargs: Any,
    ) -> None:
        super().__init__(
            backbone,
            num_classes=num_classes,
            categories=categories,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            decoder_layers=decoder_layers,
            decoder_ffn_dim=decoder_ffn_dim,
            pre_norm=pre_norm,
            enforce_input_projection=enforce_input_projection,
            conv_dim=conv_dim,
            mask_dim=mask_dim,
            dropout=dropout,
            top_k=num_queries if top_k is None else top_k,
            **mask2former_kwargs,
        )
        if num_queries < 2:
            raise ValueError("OneFormer needs at least 2 queries (object queries + the task token)")
        # Mask2Former's decoder without learnt queries: they come from the task (no dropout, as
        # in the reference's decoder layers)
        self.transformer_decoder = MaskedAttentionDecoder(
            conv_dim,
            num_classes,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_heads=num_heads,
            ffn_dim=decoder_ffn_dim,
            num_layers=decoder_layers,
            pre_norm=pre_norm,
            mask_dim=mask_dim,
            enforce_input_projection=enforce_input_projection,
            learn_query_features=False,
        )
        self.task_mlp = MLP(task_seq_len, hidden_dim, hidden_dim, 2)
        self.query_transformer = QueryTransformer(
            mask_dim,
            hidden_dim,
            num_heads=num_heads,
            ffn_dim=decoder_ffn_dim,
            num_layers=query_dec_layers,
            dropout=dropout,
            pre_norm=pre_norm,
        )
        with torch.no_grad():
            for layer in self.task_mlp.layers:
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.task_seq_len = task_seq_len
        self.use_task_norm = use_task_norm
        self.num_texts = num_queries - n_ctx
        self.text_context_length = text_context_length
        self.contrastive_weight = contrastive_weight
        self.text_mapper: TextMapper | None = None
        if text_encoder:
            if self.num_texts < 1:
                raise ValueError(f"n_ctx={n_ctx} leaves no text queries for {num_queries} queries")
            self.text_mapper = TextMapper(
                hidden_dim,
                width=text_width,
                num_layers=text_layers,
                context_length=text_context_length,
                proj_layers=text_proj_layers,
                n_ctx=n_ctx,
                causal=text_causal_mask,
            )
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / contrastive_temperature)))
        self.register_buffer(
            "task_ids",
            torch.stack([task_token_ids(t, task_seq_len) for t in self.tasks]),
            persistent=False,
        )
        self.default_task = self.tasks[0]
        self._class_text_ids: Tensor | None = None  # tokenised lazily: only training needs the vocabulary

    # ------------------------------------------------------------------------------ forward
    def decode(  # type: ignore[override]
        self, features: Sequence[Tensor], task_ids: Tensor, *, aux: bool | None = None
    ) -> dict[str, Any]:
        """Backbone maps + tokenised task texts ``(B, task_seq_len)`` -> ``{"class_logits",
        "mask_logits", "aux_outputs", "contrastive_queries" (B, Q, C)}`` (the queries entering the
        decoder, which the contrastive loss compares with the text queries; ``aux``, by default in
        training, fills ``aux_outputs``)."""
        mask_features, multi_scale = self.pixel_decoder(features)
        decoder = self.transformer_decoder
        task_token = self.task_mlp(task_ids.to(mask_features.dtype))
        if self.use_task_norm:  # the decoder's own output norm, as in the reference
            task_token = decoder.layernorm(task_token)
        object_queries = self.query_transformer(
            task_token if self.use_task_norm else None, decoder.query_embed.weight[:-1], mask_features
        )
        queries = torch.cat([object_queries, task_token[:, None]], 1)
        outputs = decoder(multi_scale, mask_features, queries=queries, aux=aux)
        return {**outputs, "contrastive_queries": queries}

    def _task_names(self, task: str | Sequence[str] | None, batch: int) -> list[str]:
        if task is None or isinstance(task, str):
            return [validate_task(self, task or self.default_task)] * batch
        names = [validate_task(self, t) for t in task]
        if len(names) != batch:
            raise ValueError(f"{len(names)} tasks for a batch of {batch}")
        return names

    def forward(  # type: ignore[override]
        self,
        images: Tensor | Sequence[Tensor],
        targets: Sequence[Mapping[str, Tensor]] | None = None,
        *,
        task: str | Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Evaluation: ``{"class_logits" (B, Q, C + 1), "mask_logits" (B, Q, H/4, W/4), "task"}``
        for ``task`` (one name, or one per image; ``default_task``, the first, when ``None``).
        Training: the weighted losses; each image draws its task unless ``task`` is given."""
        if not isinstance(images, Tensor):
            images = torch.stack(list(images))
        batch = images.shape[0]
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (see omniseg.data.targets.training_target)")
            if task is None:  # task-conditioned joint training: a uniform draw per image
                draws = torch.randint(len(self.tasks), (batch,)).tolist()
                names = [self.tasks[i] for i in draws]
            else:
                names = self._task_names(task, batch)
            return self.training_losses(images, targets, names)
        names = self._task_names(task, batch)
        task_ids = self.task_ids[[self.tasks.index(n) for n in names]]
        outputs = self.decode(self.backbone(images), task_ids)
        return {
            "class_logits": outputs["class_logits"],
            "mask_logits": outputs["mask_logits"],
            "task": names[0] if len(set(names)) == 1 else names,
        }

    # ------------------------------------------------------------------------------- losses
    def _is_thing(self) -> Tensor:
        if self.categories is None:  # without a table every class is a thing
            return torch.ones(self.num_classes, dtype=torch.bool)
        return torch.tensor([bool(c.isthing) for c in self.categories])

    def class_text_ids(self) -> Tensor:
        """``(C + 3, text_context_length)``: "a photo with a {class}" per class (its table name, or
        its index without a table), then the three tasks' padding texts; tokenised once."""
        if self._class_text_ids is None:
            from omniseg.models.layers.clip_tokenizer import default_tokenizer

            names = [c.name for c in self.categories] if self.categories is not None else None
            names = names or [str(i) for i in range(self.num_classes)]
            texts = [f"a photo with a {name}" for name in names] + [task_texts(t) for t in self.tasks]
            self._class_text_ids = default_tokenizer().tokenize(texts, self.text_context_length)
        return self._class_text_ids

    def text_tokens(self, targets: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> Tensor:
        """``(B, num_texts, L)``: per image, one class text per target segment in class order
        (as the reference lists them), the rest the task's padding text; cut at ``num_texts``."""
        table = self.class_text_ids()
        rows = []
        for target, name in zip(targets, names, strict=True):
            index = torch.full(
                (self.num_texts,), self.num_classes + self.tasks.index(name), dtype=torch.int64
            )
            labels = target["labels"].cpu().sort(stable=True).values[: self.num_texts]
            index[: len(labels)] = labels
            rows.append(table[index])
        return torch.stack(rows)

    def contrastive_loss(self, image_queries: Tensor, text_queries: Tensor) -> Tensor:
        """Symmetric InfoNCE between each image's flattened queries and its flattened text queries."""
        image = F.normalize(image_queries.float().flatten(1), dim=-1)
        text = F.normalize(text_queries.float().flatten(1), dim=-1)
        logits_per_text = text @ image.t() * self.logit_scale.exp().clamp(max=100)
        labels = torch.arange(len(image), device=image.device)
        return F.cross_entropy(logits_per_text.t(), labels) + F.cross_entropy(logits_per_text, labels)

    def training_losses(
        self, images: Tensor, targets: Sequence[Mapping[str, Tensor]], names: Sequence[str]
    ) -> dict[str, Tensor]:
        """Mask2Former's losses on each image's task targets, plus ``loss_contrastive``."""
        if len(targets) != len(names):
            raise ValueError(f"{len(targets)} targets for a batch of {len(names)}")
        is_thing = self._is_thing()
        encoded = [
            task_targets(t, n, is_thing)
            for t, n in zip(encode_mask_targets(targets, self.categories), names, strict=True)
        ]
        task_ids = self.task_ids[[self.tasks.index(n) for n in names]]
        outputs = self.decode(self.backbone(images), task_ids)
        losses = self.losses(outputs, encoded)
        if self.text_mapper is not None:
            tokens = self.text_tokens(encoded, names).to(images.device)
            text_queries = self.text_mapper(tokens)
            losses["loss_contrastive"] = self.contrastive_weight * self.contrastive_loss(
                outputs["contrastive_queries"], text_queries
            )
        return losses

    # ------------------------------------------------------------------------- post-process
    def post_process(
        self,
        outputs: Mapping[str, Any],
        image_sizes: Sequence[Sequence[int]],
        *,
        task: str | None = None,
        **options: Any,
    ) -> list[Segments]:
        """Mask2Former's post-processing (see :meth:`Mask2Former.post_process`) for ``task`` (the
        outputs' own task when ``None``). Outputs conditioned on another task are refused: a
        OneFormer prediction is only meant for the task whose token produced it."""
        produced = outputs.get("task")
        if task is None:
            task = produced if isinstance(produced, str) else self.default_task
        if isinstance(produced, str) and produced != task:
            raise ValueError(
                f"outputs were produced for the {produced!r} task; run model(images, task={task!r}) "
                f"(or set model.default_task = {task!r}) for {task} results"
            )
        return super().post_process(outputs, image_sizes, task=task, **options)


@register_model("oneformer")
def oneformer(
    *,
    categories: CategoryTable | Sequence[Mapping] | None = None,
    num_classes: int | None = None,
    backbone: str = "efficientnet_lite0",
    pretrained_backbone: bool | str = False,
    **kwargs: Any,
) -> OneFormer:
    """OneFormer on ``backbone``. With ``categories`` the class count follows from it (and the
    class texts use its names); otherwise give ``num_classes``. ``kwargs`` go to :class:`OneFormer`."""
    table = as_category_table(categories)
    if table is not None:
        if num_classes not in (None, len(table)):
            raise ValueError(
                f"num_classes={num_classes} disagrees with the category table ({len(table)} categories)"
            )
        num_classes = len(table)
    if num_classes is None:
        raise ValueError("give categories or num_classes")
    return OneFormer(
        build_backbone(backbone, pretrained=pretrained_backbone),
        num_classes=num_classes,
        categories=table,
        **kwargs,
    )
