"""The `torch` backend: pure PyTorch, any device, the fallback that always exists.

Max pooling over a bin is separable: first each row of the ROI is reduced over every column bin,
then the row results are reduced over every row bin. Taking the first maximal column of a row and
then the first row whose maximum wins gives the first maximum in row-major order, as the
contract asks. ROIs are processed in chunks, sorted by size, so memory stays bounded.
"""

from __future__ import annotations

import torch

from .backend import Backend, RoIPoolProblem
from .geometry import RoiBins, problem_bins

# Elements gathered per chunk (values plus masks): bounds the extra memory to a few hundred MB.
CHUNK_ELEMENTS = 1 << 24


def _first_max(values: torch.Tensor, valid: torch.Tensor, dim: int):
    """Contract maximum along `dim` among `valid` entries: (max, index of its first occurrence).

    NaN is maximal. Where no entry is valid the max is -inf and the index 0.
    """
    masked = torch.where(valid, values, float("-inf"))
    best = masked.amax(dim=dim, keepdim=True)
    hit = valid & ((masked == best) | (masked.isnan() & best.isnan()))
    index = hit.to(torch.uint8).argmax(dim=dim)
    # The element itself, not `best`: among equal maxima (-0.0 and 0.0) amax may return either.
    return masked.gather(dim, index.unsqueeze(dim)).squeeze(dim), index


def _pool_chunk(
    x: torch.Tensor, bins: RoiBins, rois: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the ROIs at positions `rois` (all with non-empty spans). Returns (K', C, PH, PW)."""
    device = x.device
    batch = bins.batch_index[rois]
    hstart, hend = bins.hstart[rois], bins.hend[rois]
    wstart, wend = bins.wstart[rois], bins.wend[rois]
    first_row = hstart[:, :1]
    span = int((hend[:, -1:] - first_row).max())
    col_len = int((wend - wstart).max())
    row_len = int((hend - hstart).max())

    # Stage 1: every row of the ROI's row span, reduced over each column bin.
    rows = first_row + torch.arange(span, device=device)  # (k, R)
    cols = wstart[:, :, None] + torch.arange(col_len, device=device)  # (k, PW, Lw)
    col_valid = cols < wend[:, :, None]
    gathered = x[
        batch[:, None, None, None],
        :,
        rows.clamp(max=x.shape[2] - 1)[:, :, None, None],
        cols.clamp(max=width - 1)[:, None, :, :],
    ]  # (k, R, PW, Lw, C)
    row_max, col_pick = _first_max(gathered, col_valid[:, None, :, :, None], dim=3)
    best_col = wstart[:, None, :, None] + col_pick  # (k, R, PW, C)

    # Stage 2: row maxima reduced over each row bin.
    offsets = (hstart - first_row)[:, :, None] + torch.arange(row_len, device=device)  # (k, PH, Lh)
    row_valid = offsets < (hend - first_row)[:, :, None]
    offsets = offsets.clamp(max=max(span - 1, 0))
    k_index = torch.arange(len(rois), device=device)[:, None, None]
    per_bin = row_max[k_index, offsets]  # (k, PH, Lh, PW, C)
    value, row_pick = _first_max(per_bin, row_valid[:, :, :, None, None], dim=2)  # (k, PH, PW, C)
    chosen_offset = torch.gather(
        offsets[:, :, :, None, None].expand_as(per_bin), 2, row_pick[:, :, None]
    )
    chosen_offset = chosen_offset.squeeze(2)  # (k, PH, PW, C)
    pw_index = torch.arange(best_col.shape[2], device=device)[None, None, :, None]
    c_index = torch.arange(best_col.shape[3], device=device)[None, None, None, :]
    column = best_col[k_index[..., None], chosen_offset, pw_index, c_index]
    argmax = (first_row[:, :, None, None] + chosen_offset) * width + column

    empty = (hend <= hstart)[:, :, None, None] | (wend <= wstart)[:, None, :, None]
    value = torch.where(empty, torch.zeros((), dtype=value.dtype, device=device), value)
    argmax = torch.where(empty, -1, argmax)
    return value.permute(0, 3, 1, 2), argmax.permute(0, 3, 1, 2)


def _chunks(costs: list[int], budget: int) -> list[tuple[int, int]]:
    """Split ascending `costs` into [start, stop) runs whose padded size fits `budget`."""
    runs, start = [], 0
    while start < len(costs):
        stop = start + 1
        while stop < len(costs) and (stop + 1 - start) * costs[stop] <= budget:
            stop += 1
        runs.append((start, stop))
        start = stop
    return runs


class TorchBackend(Backend):
    """Pure-PyTorch roi_pool: every device and dtype, exact, memory-bounded."""

    name = "torch"
    priority = 0
    device_types = frozenset({"*"})
    deterministic = True
    description = "pure PyTorch; runs on every device; the fallback"

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        x = problem.input
        _, channels, height, width = x.shape
        output.zero_()
        if argmax is not None:
            argmax.fill_(-1)
        if problem.num_rois == 0 or height == 0 or width == 0 or channels == 0:
            return
        bins = problem_bins(problem)
        span = (bins.hend[:, -1] - bins.hstart[:, 0]).clamp(min=0)
        col_len = (bins.wend - bins.wstart).amax(dim=1).clamp(min=0)
        row_len = (bins.hend - bins.hstart).amax(dim=1).clamp(min=0)
        gathered = span * col_len + row_len * problem.pooled_height
        cost = torch.where(
            (span > 0) & (col_len > 0), channels * problem.pooled_width * gathered, 0
        )
        order = torch.argsort(cost)
        sorted_cost = cost[order].tolist()
        first_busy = next((i for i, c in enumerate(sorted_cost) if c > 0), len(sorted_cost))
        busy = sorted_cost[first_busy:]
        for start, stop in _chunks(busy, CHUNK_ELEMENTS):
            rois = order[first_busy + start : first_busy + stop]
            value, index = _pool_chunk(x, bins, rois, width)
            output[rois] = value
            if argmax is not None:
                argmax[rois] = index.to(torch.int32)
