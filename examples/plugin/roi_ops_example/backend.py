"""ExampleBackend: a complete, minimal roi_ops backend.

It computes the bin edges with `roi_ops.geometry.problem_bins` (exact per the contract) and
reduces each bin with plain torch ops: slow, simple, and exact on every device.
"""

from __future__ import annotations

import torch

from roi_ops import Backend, RoIPoolProblem
from roi_ops.geometry import problem_bins


def _first_max(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, L) window -> per channel, the first maximal value (NaN is maximal) and its position."""
    best = window.amax(dim=1, keepdim=True)  # amax propagates NaN
    hit = (window == best) | (window.isnan() & best.isnan())
    return best.squeeze(1), hit.to(torch.uint8).argmax(dim=1)


class ExampleBackend(Backend):
    name = "example"
    priority = -10  # never preferred by "auto" over real backends
    device_types = frozenset({"*"})
    description = "example plugin: per-bin torch ops (slow, exact)"

    def forward(self, problem: RoIPoolProblem, output, argmax) -> None:
        x = problem.input
        _, channels, _, width = x.shape
        bins = problem_bins(problem)
        output.zero_()
        if argmax is not None:
            argmax.fill_(-1)
        columns = torch.arange(width, device=x.device)
        for k, (b, hs, he, ws, we) in enumerate(
            zip(
                bins.batch_index.tolist(),
                bins.hstart.tolist(),
                bins.hend.tolist(),
                bins.wstart.tolist(),
                bins.wend.tolist(),
                strict=True,
            )
        ):
            for ph in range(problem.pooled_height):
                for pw in range(problem.pooled_width):
                    if he[ph] <= hs[ph] or we[pw] <= ws[pw]:
                        continue
                    window = x[b, :, hs[ph] : he[ph], ws[pw] : we[pw]].reshape(channels, -1)
                    value, position = _first_max(window)
                    output[k, :, ph, pw] = value
                    if argmax is not None:
                        span = we[pw] - ws[pw]
                        rows = hs[ph] + position // span
                        cols = columns[ws[pw] : we[pw]][position % span]
                        argmax[k, :, ph, pw] = (rows * width + cols).to(torch.int32)
