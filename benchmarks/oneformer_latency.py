"""CPU latency of our OneFormer and Mask2Former against Hugging Face transformers' with identical weights.

    python benchmarks/oneformer_latency.py [--size 512] [--threads 2] [--repeats 3] [--classes 150]

Each HF model is built from its config with Swin-T (embed 96, depths 2-2-6-2, window 7; ADE20K's
150 classes, 150 / 100 queries, hidden 256, 10 decoder layers -- the shipped Swin-T checkpoints'
layout) and seeded random weights, written with ``save_pretrained`` and imported with our
converter (``oneformer_from_hf_directory`` / ``mask2former_from_hf_directory``), offline. Batch 1,
an ``--size`` square image, panoptic task, post-processing included: HF's image processor's
``post_process_panoptic_segmentation`` to the input size, ours ``predict_segments`` (Segments at
the input size). The models take turns over ``--repeats`` runs; medians are reported. The logits
of the two are compared on the same input (class and mask, every decoder layer's final output).

Last line: ``result: ratio_latency=<our OneFormer / HF's> max_logit_diff=<OneFormer, class or mask>
ratio_latency_mask2former=<ours / HF's> max_logit_diff_mask2former=<...>``.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from _latency import alternate
from omniseg.inference import predict_segments
from omniseg.models.hf_import import mask2former_from_hf_directory, oneformer_from_hf_directory
from omniseg.models.oneformer import task_token_ids
from omniseg.optimize import optimize_for_inference
from omniseg.structures import CategoryTable


def swin_tiny(transformers):
    return transformers.SwinConfig(
        embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, drop_path_rate=0.0,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip


def pair(kind: str, size: int, classes: int, folder: str):
    """(HF model, our model converted from its saved directory), same weights."""
    import transformers

    torch.manual_seed(0)
    if kind == "oneformer":
        config = transformers.OneFormerConfig(backbone_config=swin_tiny(transformers), num_labels=classes)
        hf = transformers.OneFormerForUniversalSegmentation(config).eval()
        convert = oneformer_from_hf_directory
    else:
        config = transformers.Mask2FormerConfig(backbone_config=swin_tiny(transformers), num_labels=classes)
        hf = transformers.Mask2FormerForUniversalSegmentation(config).eval()
        convert = mask2former_from_hf_directory
    hf.save_pretrained(folder)
    table = CategoryTable.from_dicts([{"id": i + 1, "name": f"c{i}", "isthing": i % 2} for i in range(classes)])
    ours = optimize_for_inference(convert(folder, img_size=size, categories=table).eval())
    return hf, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--classes", type=int, default=150)
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    image = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    processor = transformers.OneFormerImageProcessor()  # only its post-processing is used: no class-info file
    rows, result = [], {}
    for kind in ("oneformer", "mask2former"):
        with tempfile.TemporaryDirectory() as folder:
            hf, ours = pair(kind, args.size, args.classes, folder)
        task_ids = task_token_ids("panoptic")[None]

        def hf_forward(hf=hf, kind=kind, task_ids=task_ids):
            return hf(image, task_ids) if kind == "oneformer" else hf(image)

        def run_hf(hf_forward=hf_forward):
            outputs = hf_forward()
            return processor.post_process_panoptic_segmentation(outputs, target_sizes=[(args.size, args.size)])

        def run_ours(ours=ours):
            return predict_segments(ours, image, task="panoptic")

        with torch.inference_mode():
            expected = hf_forward()
            raw = ours(image, task="panoptic") if kind == "oneformer" else ours(image)
            diff = max(
                (raw["class_logits"] - expected.class_queries_logits).abs().max().item(),
                (raw["mask_logits"] - expected.masks_queries_logits).abs().max().item(),
            )
            seconds = alternate({"ours": run_ours, "HF": run_hf}, args.repeats)
        ratio = seconds["ours"] / seconds["HF"]
        name = "OneFormer" if kind == "oneformer" else "Mask2Former"
        rows.append(
            f"| {name} Swin-T | {seconds['ours'] * 1e3:.0f} | {seconds['HF'] * 1e3:.0f} | {ratio:.3f} | {diff:.2g} |"
        )
        suffix = "" if kind == "oneformer" else "_mask2former"
        result[f"ratio_latency{suffix}"] = round(ratio, 3)
        result[f"max_logit_diff{suffix}"] = float(f"{diff:.3g}")
    print(
        f"\n{args.size}x{args.size}, batch 1, {args.threads} threads, panoptic with post-processing, "
        f"median of {args.repeats}; transformers {transformers.__version__}\n"
    )
    print("| model | ours (ms) | Hugging Face (ms) | ours / HF | max logit diff |")
    print("|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\nresult: " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
