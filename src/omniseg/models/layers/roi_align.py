"""Multi-scale RoIAlign whose CPU inference spreads the RoIs over the intra-op threads.

torchvision's CPU RoIAlign kernel is single-threaded; it releases the GIL, so running RoI chunks
in a thread pool uses the cores PyTorch was given. Same kernel, same outputs (bit for bit).

The threaded path needs two private torchvision helpers, ``torchvision.ops.poolers._setup_scales``
(level scales and the level mapper, as ``MultiScaleRoIAlign`` infers them) and
``_convert_to_roi_format``. They are probed before first use (:data:`ROI_HELPERS`: the threaded
path must equal ``MultiScaleRoIAlign`` exactly on a test input); if they are missing or differ,
the module is torchvision's ``MultiScaleRoIAlign``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import poolers as _tv_poolers
from torchvision.ops import roi_align as tv_roi_align

from omniseg.models.layers.fast_inference import fast_path_enabled
from omniseg.models.layers.private_ops import PrivateOp

__all__ = ["ROI_HELPERS", "ParallelMultiScaleRoIAlign"]


def _resolve_helpers():
    return _tv_poolers._setup_scales, _tv_poolers._convert_to_roi_format


def _probe_helpers(helpers) -> bool:
    g = torch.Generator().manual_seed(0)
    features = {"0": torch.randn(1, 3, 16, 20, generator=g), "1": torch.randn(1, 3, 8, 10, generator=g)}
    xy = torch.rand(40, 2, generator=g) * 40
    boxes = [torch.cat([xy, xy + 2 + torch.rand(40, 2, generator=g) * 150], 1)]  # both levels used
    pooler = ParallelMultiScaleRoIAlign(["0", "1"], 3, 2)
    got = pooler.threaded_forward(features, boxes, [(64, 80)], helpers, threads=2)
    expected = MultiScaleRoIAlign(["0", "1"], 3, 2)(features, boxes, [(64, 80)])
    return torch.equal(got, expected)


ROI_HELPERS = PrivateOp(
    "torchvision.ops.poolers._setup_scales/_convert_to_roi_format", _resolve_helpers, _probe_helpers
)


class ParallelMultiScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` whose CPU inference (with ``fast``) splits the RoIs over the
    intra-op threads. ``fast`` is off as built; :func:`omniseg.optimize_for_inference` sets it."""

    _pool: ThreadPoolExecutor | None = None
    inference_option = "threaded_roi_align"  # the optimize_for_inference option that sets ``fast``
    fast: bool = False
    min_rois: int = 64  # below, the thread hand-off costs more than it saves

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        threads = torch.get_num_threads()
        if self.fast and threads >= 2 and sum(len(b) for b in boxes) >= self.min_rois:
            first = next((v for k, v in x.items() if k in self.featmap_names), None)
            if first is not None and fast_path_enabled(first):
                helpers = ROI_HELPERS.get()
                if helpers is not None:
                    try:
                        return self.threaded_forward(x, boxes, image_shapes, helpers, threads)
                    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
                        ROI_HELPERS.fail(exc)
        return super().forward(x, boxes, image_shapes)

    def threaded_forward(
        self,
        x: dict[str, Tensor],
        boxes: list[Tensor],
        image_shapes: list[tuple[int, int]],
        helpers: tuple,
        threads: int,
    ) -> Tensor:
        """The pooling with each level's RoIs split into ``threads`` chunks run in a thread pool."""
        setup_scales, convert_to_roi_format = helpers
        features = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        result = rois.new_zeros((len(rois), features[0].shape[1], *self.output_size))
        if ParallelMultiScaleRoIAlign._pool is None:
            ParallelMultiScaleRoIAlign._pool = ThreadPoolExecutor(max_workers=max(threads, 2))
        jobs = []
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            index = torch.where(levels == level)[0]
            if not len(index):
                continue
            for chunk in index.tensor_split(threads):
                if len(chunk):
                    job = self._pool.submit(
                        tv_roi_align, feature, rois[chunk], self.output_size, scale, self.sampling_ratio, False
                    )
                    jobs.append((chunk, job))
        for chunk, job in jobs:
            result[chunk] = job.result()
        return result

