"""Warp-level loop trips of the unit kernel's bin scan on fpn-multi, counted on the CPU.

A warp runs a bin row while any of its lanes has rows left and, in that row, a column while
any lane still in the row has columns left; lanes whose bins are smaller wait. This counts, over
every ROI of the fpn-multi workload on its level (bins from `roi_ops.geometry.roi_bins`, ROIs
whose bins are all at most one pixel left out: they take the fixed 2 x 2 path), the rows and
row-columns that warps issue and the element visits lanes need, for three orders of work:

- ``current``: the unit kernel's layout, a block's 256 threads in groups of PH * PW bins (a
  lane a bin, four channels a step);
- ``sorted``: the same, each group's bins ordered by their (width, height) class;
- ``class-major``: (bin, four channels) items of a block's channel block ordered by the bin's
  class, then channels, then bin, dealt to the threads in turn (so a warp's lanes share a
  class but each item brings its own bin geometry).

    python backends/cupy/tools/warp_trips.py

Prints, per order, the issued counts, the average lanes doing work in an issued row-column,
and the ratio to ``current`` (on the same work: a channel block of 80 channels, 20 steps of
four channels in 5 groups). Needs no GPU; takes seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from roi_ops.bench.pyramid import FPN_MULTI, make_boxes
from roi_ops.geometry import roi_bins
from roi_ops.levels import level_range, levels_by_formula

THREADS = 256  # planning.THREADS
CHANNELS_PER_STEP = 4  # kUnitChannels
CHANNELS_PER_BLOCK = 80  # fpn-multi float32's channel block


@dataclass
class Trips:
    rows: int = 0  # bin rows issued by warps
    columns: int = 0  # row-columns issued by warps
    useful: int = 0  # element visits lanes need

    def add_warp(self, bins: list[tuple[int, int]]) -> None:
        """One warp's pass over the (height, width) bins of its working lanes."""
        bins = [(h, w) for h, w in bins if h > 0 and w > 0]
        if not bins:
            return
        tallest = max(h for h, _ in bins)
        self.rows += tallest
        for i in range(tallest):
            self.columns += max(w for h, w in bins if h > i)
        self.useful += sum(h * w for h, w in bins)


def lane_order(bins: list[tuple[int, int]], sort: bool) -> list[tuple[int, int]]:
    """A block's lanes: groups of len(bins) lanes, a bin each (by class when `sort`), the
    threads left after the last whole group idle (height 0)."""
    order = sorted(range(len(bins)), key=lambda q: (bins[q][1], bins[q][0], q)) if sort else None
    groups = THREADS // len(bins)
    lanes = []
    for tid in range(THREADS):
        group, slot = divmod(tid, len(bins))
        lanes.append(bins[order[slot] if sort else slot] if group < groups else (0, 0))
    return lanes


def class_major_items(bins: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A channel block's (bin, four channels) items ordered by class, then channels, then bin."""
    steps = CHANNELS_PER_BLOCK // CHANNELS_PER_STEP
    return [b for c in sorted(set(bins)) for _ in range(steps) for b in bins if b == c]


def count() -> dict[str, Trips]:
    """The three orders' trips over every fpn-multi ROI (float32 boxes) on its level."""
    w = FPN_MULTI
    rois = make_boxes(w, torch.float32, "cpu")
    scales = tuple(w.spatial_scales)
    levels = levels_by_formula(rois, *level_range(scales))
    size = w.output_size
    trips = {"current": Trips(), "sorted": Trips(), "class-major": Trips()}
    steps_per_block = CHANNELS_PER_BLOCK // CHANNELS_PER_STEP // (THREADS // (size * size))
    for level, scale in enumerate(scales):
        height = math.ceil(w.image_height * scale)
        width = math.ceil(w.image_width * scale)
        rows = (levels == level).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        b = roi_bins(rois[rows], w.num_images, height, width, size, size, scale)
        heights = (b.hend - b.hstart).clamp(min=0).tolist()
        widths = (b.wend - b.wstart).clamp(min=0).tolist()
        for hs, ws in zip(heights, widths, strict=True):
            if max(hs) <= 1 and max(ws) <= 1:
                continue
            bins = [(hs[q // size], ws[q % size]) for q in range(size * size)]
            for name, sort in (("current", False), ("sorted", True)):
                lanes = lane_order(bins, sort)
                for _ in range(steps_per_block):
                    for start in range(0, THREADS, 32):
                        trips[name].add_warp(lanes[start : start + 32])
            items = class_major_items(bins)
            for start in range(0, len(items), 32):
                trips["class-major"].add_warp(items[start : start + 32])
    return trips


def main() -> int:
    trips = count()
    base = trips["current"]
    print(f"fpn-multi: {FPN_MULTI.describe()}, {CHANNELS_PER_BLOCK}-channel blocks")
    for name, t in trips.items():
        print(
            f"{name:12s} rows {t.rows:>10,d} ({t.rows / base.rows:.3f})  row-columns "
            f"{t.columns:>11,d} ({t.columns / base.columns:.3f})  working lanes "
            f"{t.useful / t.columns:4.1f} of 32  (element visits {t.useful:,})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
