"""The ``fpn-multi`` benchmark: roi_ops' one-call multi-level pooling against the per-level loop
that torchvision's ``MultiScaleRoIAlign`` (and detectron2's ``ROIPooler``) write, run over
``torchvision.ops.roi_pool`` and over ``roi_ops.roi_pool``.

The loop is torchvision's: the level of each box (its ``LevelMapper``), then per level the
boxes of that level (``torch.where``, which waits for the device), a pooling call and a scatter of
the rows back into place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..functional import roi_pool
from ..levels import level_range, levels_by_formula
from ..multi_scale import multi_scale_roi_pool
from .runner import MODES, TORCHVISION, Timing, row_fields, time_calls, torchvision_roi_pool

FUSED = "roi_ops (one call)"
LOOP_ROI_OPS = "loop over roi_ops.roi_pool"
LOOP_TORCHVISION = "loop over torchvision"


@dataclass(frozen=True)
class PyramidWorkload:
    """A feature pyramid P2.. of a batch of images, and boxes that span every level."""

    name: str
    num_images: int
    channels: int
    image_height: int
    image_width: int
    levels: int  # P2 .. P(levels + 1), strides 4 .. 2^(levels + 1)
    rois_per_image: int
    output_size: int
    box_min: float
    box_max: float

    @property
    def spatial_scales(self) -> list[float]:
        return [1 / 2 ** (2 + level) for level in range(self.levels)]

    @property
    def num_rois(self) -> int:
        return self.num_images * self.rois_per_image

    def scaled_for_cpu(self) -> PyramidWorkload:
        """A smaller copy, so that a CPU sweep stays short."""
        return replace(self, num_images=2, channels=16, rois_per_image=64)

    def describe(self) -> str:
        return (
            f"N={self.num_images} C={self.channels} P2-P{self.levels + 1} of "
            f"{self.image_height}x{self.image_width} K={self.num_rois} out={self.output_size}"
        )


FPN_MULTI = PyramidWorkload("fpn-multi", 8, 256, 800, 1088, 4, 1000, 7, 16, 800)


def make_pyramid(
    workload: PyramidWorkload, dtype: torch.dtype, device, seed: int = 0
) -> list[torch.Tensor]:
    """The levels, finest first: random normal features."""
    g = torch.Generator().manual_seed(seed)
    features = []
    for scale in workload.spatial_scales:
        shape = (
            workload.num_images,
            workload.channels,
            math.ceil(workload.image_height * scale),
            math.ceil(workload.image_width * scale),
        )
        features.append(torch.randn(shape, generator=g).to(dtype).to(device))
    return features


def make_boxes(workload: PyramidWorkload, dtype: torch.dtype, device, seed: int = 1):
    """(K, 5) rows: log-uniform box sides in [box_min, box_max], inside the image."""
    g = torch.Generator().manual_seed(seed)
    k = workload.num_rois
    low, high = math.log(workload.box_min), math.log(workload.box_max)
    side = torch.exp(low + (high - low) * torch.rand(k, 1, generator=g, dtype=torch.float64))
    aspect = torch.exp(torch.rand(k, 1, generator=g, dtype=torch.float64) - 0.5)
    width = torch.clamp(side * aspect, max=workload.image_width - 1)
    height = torch.clamp(side / aspect, max=workload.image_height - 1)
    x1 = torch.rand(k, 1, generator=g, dtype=torch.float64) * (workload.image_width - width)
    y1 = torch.rand(k, 1, generator=g, dtype=torch.float64) * (workload.image_height - height)
    batch = torch.arange(k, dtype=torch.float64)[:, None] // workload.rois_per_image
    rois = torch.cat([batch, x1, y1, x1 + width, y1 + height], dim=1)
    return rois.to(dtype).to(device)


def level_loop(pool: Callable, features, rois, output_size: int, scales) -> torch.Tensor:
    """Per-level pooling as torchvision's ``_multiscale_roi_align`` writes it (its
    ``LevelMapper``'s operations included)."""
    levels = levels_by_formula(rois, *level_range(scales))
    first = features[0]
    result = torch.zeros(
        (rois.shape[0], first.shape[1], output_size, output_size),
        dtype=first.dtype,
        device=first.device,
    )
    for level, (feature, scale) in enumerate(zip(features, scales, strict=True)):
        index = torch.where(levels == level)[0]
        result[index] = pool(feature, rois[index], output_size, scale).to(result.dtype)
    return result


@dataclass
class PyramidMeasurement:
    """One row of the fpn-multi table."""

    workload: str
    shape: str
    device: str
    dtype: str
    method: str
    times: dict[str, Timing] = field(default_factory=dict)
    error: str | None = None


def pyramid_methods() -> dict[str, Callable]:
    """The compared calls by name: the one call, and the loops (torchvision when it imports)."""
    methods = {
        FUSED: lambda f, r, s, sc: multi_scale_roi_pool(f, r, s, sc),
        LOOP_ROI_OPS: lambda f, r, s, sc: level_loop(roi_pool, f, r, s, sc),
    }
    tv = torchvision_roi_pool()
    if tv is not None:
        methods[LOOP_TORCHVISION] = lambda f, r, s, sc: level_loop(
            lambda x, b, o, scale: tv(x, b.to(x.dtype), o, scale), f, r, s, sc
        )
    return methods


def _timed_call(mode: str, call: Callable, features, rois, size: int, scales, grad):
    """What one timed sample runs for `mode` (``infer``, ``fwd`` or ``fwd+bwd``)."""
    if mode == "infer":

        def infer():
            with torch.no_grad():
                call(features, rois, size, scales)

        return infer
    if mode == "fwd":
        return lambda: call(features, rois, size, scales)

    def forward_backward():
        for leaf in features:
            leaf.grad = None
        call(features, rois, size, scales).backward(grad)

    return forward_backward


def run_pyramid_benchmark(
    device: torch.device,
    dtypes: list[torch.dtype],
    workload: PyramidWorkload,
    budget_s: float,
    modes: tuple[str, ...] = MODES,
    queue: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[PyramidMeasurement]:
    """Time every method in every dtype and mode at default settings."""
    results = []
    for dtype in dtypes:
        features = make_pyramid(workload, dtype, device)
        rois = make_boxes(workload, torch.float32 if dtype == torch.bfloat16 else dtype, device)
        scales = workload.spatial_scales
        leaves = [f.detach().requires_grad_(True) for f in features]
        grad = None
        for method, call in pyramid_methods().items():
            row = PyramidMeasurement(*row_fields(workload, device, dtype), method)
            for mode in modes:
                if progress:
                    progress(f"{workload.name} {row.dtype} {method} {mode}")
                try:
                    if mode == "fwd+bwd" and grad is None:
                        shape = call(features, rois, workload.output_size, scales).shape
                        grad = torch.randn(shape, device=device).to(dtype)
                    inputs = leaves if mode != "infer" else features
                    run = _timed_call(mode, call, inputs, rois, workload.output_size, scales, grad)
                    row.times[mode] = time_calls(run, device, budget_s, queue=queue)
                except Exception as error:  # torchvision without this dtype, say
                    row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                    break
            results.append(row)
    return results


def format_pyramid_table(results: list[PyramidMeasurement]) -> str:
    """Median ms per call of each method, and the one call's speed-up over each loop."""
    header = f"{'dtype':<9} {'method':<27}" + "".join(f"{m + ' ms':>11}" for m in MODES)
    header += "".join(f"{'x ' + m:>10}" for m in MODES)
    lines = [f"{results[0].workload}: {results[0].shape}" if results else "", header]
    index = {(r.dtype, r.method): r for r in results}
    for row in results:
        if row.error:
            lines.append(f"{row.dtype:<9} {row.method:<27} error: {row.error}")
            continue
        cells = "".join(
            f"{row.times[m].median:>11.3f}" if m in row.times else f"{'-':>11}" for m in MODES
        )
        fused = index.get((row.dtype, FUSED))
        speedups = ""
        for mode in MODES:
            if fused is None or row.method == FUSED or mode not in row.times:
                speedups += f"{'':>10}"
            elif mode in fused.times:
                speedups += f"{row.times[mode].median / fused.times[mode].median:>9.2f}x"
        lines.append(f"{row.dtype:<9} {row.method:<27}{cells}{speedups}")
    lines.append(
        "x MODE: the loop's time over roi_ops' one call (higher: the one call is faster); "
        f"the {TORCHVISION} loop is torchvision's MultiScaleRoIAlign loop over roi_pool"
    )
    return "\n".join(lines)
