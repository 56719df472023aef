"""The Triton backend's kernel figures quoted in its README (needs CUDA and torchvision).

    python backends/triton/tools/h200_figures.py

Kernel times (``triton.testing.do_bench`` medians, ms), float32, every bench workload, one row
per part:

- ``fwd``: the forward with the argmax, NCHW and channels_last, at the default tuning (the unit
  or channels_last kernel) against the flat kernel (``kernel="flat"``) and torchvision's op;
  whether the two kernels give the same bits.
- ``bwd``: the NCHW backward at the default outputs per program against 1024 of them, streamed
  (the accumulation buffer larger than L2) and cached.
- ``bwdcl``: a channels_last input's backward with the gradient written channels_last against
  written contiguous and copied (what roi_ops does with a contiguous one), beside the ratio of
  input to grad_output elements that ``gradient_layout="auto"`` decides by.
"""

from __future__ import annotations

import dataclasses

import torch
import torchvision  # noqa: F401  (registers torchvision's ops)
import triton.testing

from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops_triton import launch
from roi_ops_triton.tuning import DEFAULT_TUNING

DEVICE = torch.device("cuda")
RUNNERS = {
    "default": {},
    "flat": {"kernel": "flat"},
    "bwd_stream1024": {"backward_outputs_streamed": 1024},
    "bwd_cached1024": {"backward_outputs": 1024},
    "grad_cl": {"gradient_layout": "channels_last"},
    "grad_contig": {"gradient_layout": "contiguous"},
}


def ms(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def forward_row(runners, name, w, x, rois, layout) -> torch.Tensor:
    """Prints the forward row; returns the default kernel's argmax."""
    s = w.output_size
    shape = (rois.shape[0], x.shape[1], s, s)
    outs = {
        k: (torch.full(shape, float("nan"), device=DEVICE),
            torch.full(shape, -7, dtype=torch.int32, device=DEVICE))
        for k in ("default", "flat")
    }  # fmt: skip
    problem = RoIPoolProblem(x, rois, s, s, w.spatial_scale, True)
    for k, (out, arg) in outs.items():
        runners[k].forward(problem, out, arg)
    same = same_bits(outs["default"][0], outs["flat"][0]) and torch.equal(
        outs["default"][1], outs["flat"][1]
    )
    t = {k: ms(lambda k=k: runners[k].forward(problem, *outs[k])) for k in outs}
    tv = ms(lambda: torch.ops.torchvision.roi_pool(x, rois, w.spatial_scale, s, s))
    print(f"fwd | {name} | {layout} | {tv:.3f} | {t['default']:.3f} | {t['flat']:.3f} | "
          f"{tv / t['default']:.2f}x | {same}", flush=True)  # fmt: skip
    return outs["default"][1]


def backward_row(runners, name, x, rois, argmax) -> None:
    n, c, h, wd = x.shape
    grad = torch.randint(1, 4, argmax.shape, device=DEVICE).float()  # exact sums in any order
    if not x.is_contiguous(memory_format=torch.channels_last):
        problem = RoIPoolBackwardProblem(
            grad, argmax, rois, (n, c, h, wd), x.dtype, torch.contiguous_format
        )
        keys = ["default", "bwd_stream1024", "bwd_cached1024"]
        first = runners["default"].backward(problem)
        same = all(torch.equal(first, runners[k].backward(problem)) for k in keys[1:])
        t = {k: ms(lambda k=k: runners[k].backward(problem)) for k in keys}
        cells = " | ".join(f"{k} {t[k]:.3f}" for k in keys)
        print(f"bwd | {name} | nchw | {cells} | same {same}", flush=True)
        return
    problem = RoIPoolBackwardProblem(
        grad, argmax, rois, (n, c, h, wd), x.dtype, torch.channels_last
    )

    def contiguous_then_copied():
        gradient = runners["grad_contig"].backward(problem)
        return gradient.contiguous(memory_format=torch.channels_last)

    same = torch.equal(
        runners["grad_cl"].backward(problem).contiguous(), contiguous_then_copied().contiguous()
    )
    written = ms(lambda: runners["grad_cl"].backward(problem))
    copied = ms(contiguous_then_copied)
    print(f"bwdcl | {name} | cl | grad channels_last {written:.3f} | contiguous+copy "
          f"{copied:.3f} | elems in/out {x.numel() / grad.numel():.2f} | same {same}",
          flush=True)  # fmt: skip


def main() -> None:
    runners = {
        k: launch.Runner(dataclasses.replace(DEFAULT_TUNING, **v)) for k, v in RUNNERS.items()
    }
    print("part | workload | layout | tv ms | default ms | flat ms | tv/default | same bits")
    for name, w in WORKLOADS.items():
        rois = make_rois(w, torch.float32, DEVICE)
        for channels_last in (False, True):
            x = make_input(w, torch.float32, DEVICE, channels_last=channels_last)
            layout = "cl" if channels_last else "nchw"
            argmax = forward_row(runners, name, w, x, rois, layout)
            backward_row(runners, name, x, rois, argmax)


if __name__ == "__main__":
    main()
