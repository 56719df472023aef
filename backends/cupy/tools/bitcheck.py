"""Bit-identity check of the CuPy backend across two checkouts, on a CUDA device.

Runs the backend's forward (with and without argmax) and backward on every bench workload
(`roi_ops.bench.workloads.WORKLOADS`), in float32, float16, bfloat16 and float64, on NCHW and
channels_last inputs, with normal and tie-heavy features (small integers, -0.0, NaN, -inf), and
writes a fingerprint of every output, argmax and gradient to a JSON file; `compare` recomputes
them with the current checkout and reports every difference. Gradients use small integer
grad_outputs, so every sum is exact and the result does not depend on the order of the atomic
additions (the backward is not run-to-run deterministic otherwise).

    # in the old checkout, then in the new one:
    python backends/cupy/tools/bitcheck.py save /tmp/bits-old.json
    python backends/cupy/tools/bitcheck.py compare /tmp/bits-old.json

Works with any checkout whose CupyBackend takes `RoIPoolProblem` in forward, and either a
`RoIPoolBackwardProblem` or the older loose arguments in backward. Fingerprints are computed
on the device (two wrapping 64-bit sums of the bits), so the run takes about a minute.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import torch
from roi_ops.backend import RoIPoolProblem
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois

DTYPES = ("float32", "float16", "bfloat16", "float64")
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_MULTIPLIER = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64


def fingerprint(t: torch.Tensor) -> list[int]:
    """[elements, sum of bits * odd position weights, sum of bits xor positions] (wrapping),
    over the tensor in its logical (contiguous) order."""
    flat = t.contiguous().reshape(-1)
    words = flat.view(_BITS[flat.element_size()]).to(torch.int64)
    index = torch.arange(words.numel(), device=words.device, dtype=torch.int64)
    weighted = int((words * (index * _MULTIPLIER | 1)).sum())
    mixed = int((words ^ index).sum())
    return [words.numel(), weighted, mixed]


def tie_heavy(x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """Small integers (many ties), about half the zeros negative, 0.1 % NaN and 0.1 % -inf."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    values = torch.randint(-3, 3, x.shape, generator=g, device=x.device).to(torch.float32)
    sign = torch.rand(x.shape, generator=g, device=x.device) < 0.5
    values = torch.where((values == 0) & sign, torch.full_like(values, -0.0), values)
    special = torch.rand(x.shape, generator=g, device=x.device)
    values[special < 0.001] = float("nan")
    values[special > 0.999] = float("-inf")
    return values.to(x.dtype).contiguous(memory_format=_format(x))


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last


def _backward(backend, grad, argmax, rois, shape, dtype, memory_format):
    """The backend's backward, through whichever signature this checkout has."""
    parameters = inspect.signature(backend.backward).parameters
    if len(parameters) == 1:
        from roi_ops.backend import RoIPoolBackwardProblem

        problem = RoIPoolBackwardProblem(grad, argmax, rois, shape, dtype, memory_format)
        return backend.backward(problem)
    batch = rois[:, 0].to(torch.int64).clamp_(0, shape[0] - 1)
    return backend.backward(grad, argmax, batch, shape, dtype, memory_format)


def run_all(workloads, dtypes) -> dict[str, list[int]]:
    """Fingerprints of every (workload, dtype, layout, input, result)."""
    from roi_ops_cupy.backend import CupyBackend

    backend = CupyBackend()
    reason = backend.check_available()
    if reason is not None:
        sys.exit(f"bitcheck: the cupy backend cannot run here: {reason}")
    device = torch.device("cuda")
    results: dict[str, list[int]] = {}
    for name in workloads:
        w = WORKLOADS[name]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
            rois = make_rois(w, rois_dtype, device)
            for layout in ("nchw", "channels_last"):
                normal = make_input(w, dtype, device, channels_last=layout == "channels_last")
                for inputs, x in (("normal", normal), ("ties", tie_heavy(normal))):
                    key = f"{name}/{dtype_name}/{layout}/{inputs}"
                    shape = (rois.shape[0], w.channels, w.output_size, w.output_size)
                    problem = RoIPoolProblem(
                        x, rois, w.output_size, w.output_size, w.spatial_scale, True
                    )
                    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
                    arg = torch.full(shape, -7, dtype=torch.int32, device=device)
                    backend.forward(problem, out, arg)
                    results[f"{key}/output"] = fingerprint(out)
                    results[f"{key}/argmax"] = fingerprint(arg)
                    inference = RoIPoolProblem(
                        x, rois, w.output_size, w.output_size, w.spatial_scale, False
                    )
                    out2 = torch.full(shape, 1.5, dtype=dtype, device=device)
                    backend.forward(inference, out2, None)
                    results[f"{key}/inference"] = fingerprint(out2)
                    g = torch.Generator(device=device).manual_seed(3)
                    grad = torch.randint(-3, 4, shape, generator=g, device=device).to(dtype)
                    grad_input = _backward(
                        backend, grad, arg, rois, tuple(x.shape), dtype, _format(x)
                    )
                    results[f"{key}/gradient"] = fingerprint(grad_input)
                    del out, arg, out2, grad, grad_input
            print(f"bitcheck: {name} {dtype_name} done", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["save", "compare"])
    parser.add_argument("path", help="the JSON file to write (save) or to compare with")
    parser.add_argument("--workload", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    args = parser.parse_args()
    start = time.perf_counter()
    results = run_all(args.workload, args.dtype)
    elapsed = time.perf_counter() - start
    if args.action == "save":
        with open(args.path, "w") as handle:
            json.dump(results, handle, indent=0, sort_keys=True)
        print(f"bitcheck: {len(results)} fingerprints saved to {args.path} ({elapsed:.0f} s)")
        return 0
    with open(args.path) as handle:
        saved = json.load(handle)
    common = sorted(set(saved) & set(results))
    differ = [key for key in common if saved[key] != results[key]]
    missing = sorted(set(saved) ^ set(results))
    for key in differ:
        print(f"DIFFERS {key}")
    print(
        f"bitcheck: {len(common) - len(differ)} of {len(common)} results bit-identical, "
        f"{len(differ)} differ; {len(missing)} in only one of the two runs ({elapsed:.0f} s)"
    )
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
