"""Warp-level loop trips and load sectors of the unit kernel's bin scan on fpn-multi, on the CPU.

A warp runs a bin row while any of its lanes has rows left and, in that row, a column while
any lane still in the row has columns left; lanes whose bins are smaller wait. Each issued
row-column is one load per channel, which touches the 32-byte sectors of its working lanes'
elements. This counts, over the fpn-multi ROIs on their levels (bins from
`roi_ops.geometry.roi_bins`, ROIs whose bins are all at most one pixel left out: they take the
fixed 2 x 2 path), the rows and row-columns that warps issue, the element visits lanes need and
the sectors a channel's loads touch (float32 NCHW maps), for five orders of work:

- ``current``: the unit kernel's layout, a block's 256 threads in groups of PH * PW bins (a
  lane a bin for all its channels, four channels a step);
- ``sorted``: the same, each group's bins ordered by their (width, height) class;
- ``rows``: a lane still keeps its bin, but the block's (bin, group) lanes are ordered by the
  height of the bin's row, then group, then bin: a warp's lanes mostly share their row count,
  and a bin row's lanes stay side by side;
- ``pairs``: the (bin, group) lanes ordered by the bin's (width, height) class, then group,
  then bin: a warp's lanes mostly share both counts, but a bin row's lanes are split by class;
- ``class-major``: (bin, four channels) items of a block's channel block ordered by the bin's
  class, then channels, then bin, dealt to the threads in turn (each item brings its own bin).

    python backends/cupy/tools/warp_trips.py [--sample N]

Prints, per order, the issued counts, the average lanes doing work in an issued row-column,
the sectors a load touches and the ratios to ``current`` (on the same work: a channel block of
80 channels, 20 steps of four channels in 5 groups). ``--sample N`` counts N random ROIs of each
level (default 300; 0: all of them, about a minute). Needs no GPU.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass

import torch
from roi_ops.bench.pyramid import FPN_MULTI, make_boxes
from roi_ops.geometry import roi_bins
from roi_ops.levels import level_range, levels_by_formula

THREADS = 256  # planning.THREADS
CHANNELS_PER_STEP = 4  # kUnitChannels
CHANNELS_PER_BLOCK = 80  # fpn-multi float32's channel block
SECTOR_ELEMENTS = 8  # float32 elements in a 32-byte sector


@dataclass(frozen=True)
class Lane:
    """A lane's work: its bin (first row and column, height and width) and the plane it reads
    (its channel group, or the channel quad of a class-major item)."""

    row: int
    col: int
    height: int
    width: int
    plane: int


@dataclass
class Trips:
    rows: int = 0  # bin rows issued by warps
    columns: int = 0  # row-columns issued by warps
    useful: int = 0  # element visits lanes need
    sectors: int = 0  # sectors touched by one channel's loads

    def add_warp(self, lanes: list[Lane], map_width: int, plane_size: int) -> None:
        """One warp's pass over the bins of its working lanes."""
        lanes = [lane for lane in lanes if lane.height > 0 and lane.width > 0]
        if not lanes:
            return
        tallest = max(lane.height for lane in lanes)
        self.rows += tallest
        for i in range(tallest):
            in_row = [lane for lane in lanes if lane.height > i]
            for j in range(max(lane.width for lane in in_row)):
                self.columns += 1
                self.sectors += len(
                    {
                        (lane.plane * plane_size + (lane.row + i) * map_width + lane.col + j)
                        // SECTOR_ELEMENTS
                        for lane in in_row
                        if lane.width > j
                    }
                )
        self.useful += sum(lane.height * lane.width for lane in lanes)


def orders(bins: list[Lane]) -> dict[str, list[Lane]]:
    """Every order's lanes (a list a step, padded with idle lanes) for a ROI's bins (row-major,
    plane 0)."""
    groups = THREADS // len(bins)
    idle = Lane(0, 0, 0, 0, 0)

    def lanes(pairs: list[tuple[int, int]]) -> list[Lane]:
        placed = [
            Lane(b.row, b.col, b.height, b.width, g) for b, g in ((bins[q], g) for q, g in pairs)
        ]
        return placed + [idle] * (THREADS - len(placed))

    natural = [(q, g) for g in range(groups) for q in range(len(bins))]
    by_class = sorted(range(len(bins)), key=lambda q: (bins[q].width, bins[q].height, q))
    steps = CHANNELS_PER_BLOCK // CHANNELS_PER_STEP
    classes = sorted({(b.width, b.height) for b in bins})
    items = [
        Lane(b.row, b.col, b.height, b.width, quad)
        for c in classes
        for quad in range(steps)
        for b in bins
        if (b.width, b.height) == c
    ]
    return {
        "current": lanes(natural),
        "sorted": lanes([(by_class[q], g) for q, g in natural]),
        "rows": lanes(sorted(natural, key=lambda p: (bins[p[0]].height, p[1], p[0]))),
        "pairs": lanes(
            sorted(natural, key=lambda p: (bins[p[0]].width, bins[p[0]].height, p[1], p[0]))
        ),
        "class-major": items,
    }


def count(sample: int, seed: int = 0) -> dict[str, Trips]:
    """Every order's trips over the fpn-multi ROIs (float32 boxes) on their levels; `sample`
    random ROIs a level (0: all)."""
    w = FPN_MULTI
    rois = make_boxes(w, torch.float32, "cpu")
    scales = tuple(w.spatial_scales)
    levels = levels_by_formula(rois, *level_range(scales))
    size = w.output_size
    trips: dict[str, Trips] = {}
    picker = random.Random(seed)
    steps_per_block = CHANNELS_PER_BLOCK // CHANNELS_PER_STEP // (THREADS // (size * size))
    for level, scale in enumerate(scales):
        height = math.ceil(w.image_height * scale)
        width = math.ceil(w.image_width * scale)
        rows = (levels == level).nonzero().squeeze(1).tolist()
        if sample and len(rows) > sample:
            rows = picker.sample(rows, sample)
        if not rows:
            continue
        b = roi_bins(rois[rows], w.num_images, height, width, size, size, scale)
        starts_h, ends_h = b.hstart.tolist(), b.hend.tolist()
        starts_w, ends_w = b.wstart.tolist(), b.wend.tolist()
        for hs, he, ws, we in zip(starts_h, ends_h, starts_w, ends_w, strict=True):
            heights = [max(e - s, 0) for s, e in zip(hs, he, strict=True)]
            widths = [max(e - s, 0) for s, e in zip(ws, we, strict=True)]
            if max(heights) <= 1 and max(widths) <= 1:
                continue
            bins = [
                Lane(hs[q // size], ws[q % size], heights[q // size], widths[q % size], 0)
                for q in range(size * size)
            ]
            for name, lanes in orders(bins).items():
                t = trips.setdefault(name, Trips())
                repeats = 1 if name == "class-major" else steps_per_block
                for _ in range(repeats):
                    for start in range(0, len(lanes), 32):
                        t.add_warp(lanes[start : start + 32], width, height * width)
    return trips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=300)
    args = parser.parse_args()
    trips = count(args.sample)
    base = trips["current"]
    which = f"{args.sample} ROIs a level" if args.sample else "every ROI"
    print(f"fpn-multi: {FPN_MULTI.describe()}, {CHANNELS_PER_BLOCK}-channel blocks, {which}")
    for name, t in trips.items():
        print(
            f"{name:12s} rows {t.rows / base.rows:.3f}  row-columns {t.columns / base.columns:.3f}"
            f"  working lanes {t.useful / t.columns:4.1f} of 32  sectors a load "
            f"{t.sectors / t.columns:5.2f} (all sectors {t.sectors / base.sectors:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
