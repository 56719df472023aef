"""`python -m roi_ops bench`: every usable backend (and torchvision) side by side, median times.

Modes: ``infer`` (no gradient, so no argmax), ``fwd`` (forward of a call that needs a gradient,
argmax included) and ``fwd+bwd``. CUDA is timed with events after warm-up, the CPU with a
monotonic clock. The floor is the bytes that must move (input read once, output written once,
plus the argmax and gradients where the mode needs them) over the device's measured copy
bandwidth.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..backend import RoIPoolProblem
from ..config import value_checks
from ..dispatch import reasons_against
from ..functional import roi_pool
from ..registry import REGISTRY
from ..validation import check_roi_values
from .workloads import WORKLOADS, Workload, make_input, make_rois

MODES = ("infer", "fwd", "fwd+bwd")
TORCHVISION = "torchvision"


@dataclass
class Measurement:
    workload: str
    shape: str
    device: str
    dtype: str
    backend: str
    layout: str
    times_ms: dict[str, float] = field(default_factory=dict)
    floor_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(
    fn: Callable[[], object],
    device: torch.device,
    budget_s: float,
    warmup: int = 2,
    min_reps: int = 3,
    max_reps: int = 200,
    queue: int = 1,
) -> float:
    """Median wall time of `fn` in milliseconds (CUDA events on GPUs, perf_counter on CPUs).

    Runs `warmup` untimed calls (one if a call takes over a third of the budget), then repeats
    until `budget_s` has passed, at least `min_reps` and at most `max_reps` times. On CUDA, each
    sample times `queue` back-to-back calls between two events and divides: with queue = 1 the
    host's time to issue the call is part of the sample (latency of one call); with more, the
    host runs ahead as in a training loop and a sample is the steady cost per call.
    """
    for done in range(warmup):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if done == 0 and time.perf_counter() - t0 > budget_s / 3:
            break
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < max_reps and (
        len(samples) < min_reps or time.perf_counter() - started < budget_s
    ):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(queue):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / queue)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, budget_s: float) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    elements = 256 * 2**20 // 4  # 256 MiB: well past every cache
    source = torch.randn(elements, device=device)
    target = torch.empty_like(source)
    ms = median_time_ms(lambda: target.copy_(source), device, budget_s)
    return 2 * source.numel() * 4 / (ms / 1e3)


def _floor_bytes(workload: Workload, element: int) -> dict[str, int]:
    w = workload
    input_bytes = w.num_images * w.channels * w.height * w.width * element
    outputs = w.num_rois * w.channels * w.output_size**2
    forward = input_bytes + outputs * element
    with_argmax = forward + outputs * 4
    backward = outputs * (element + 4) + input_bytes  # grad_output and argmax in, grad_input out
    return {"infer": forward, "fwd": with_argmax, "fwd+bwd": with_argmax + backward}


def _torchvision_roi_pool():
    try:
        from torchvision.ops import roi_pool as tv_roi_pool
    except Exception:
        return None
    return tv_roi_pool


def _candidates(
    device: torch.device,
    dtype: torch.dtype,
    names: list[str] | None,
    x: torch.Tensor,
    rois: torch.Tensor,
    workload: Workload,
) -> list[str]:
    problem = RoIPoolProblem(
        x, rois, workload.output_size, workload.output_size, workload.spatial_scale, True
    )
    chosen = []
    for entry in REGISTRY.entries():
        if names and entry.name not in names:
            continue
        if not reasons_against(entry, problem):
            chosen.append(entry.name)
    if (names is None or TORCHVISION in names) and _torchvision_roi_pool() is not None:
        chosen.append(TORCHVISION)
    return chosen


def _runner(backend: str, x: torch.Tensor, rois: torch.Tensor, workload: Workload, mode: str):
    size, scale = workload.output_size, workload.spatial_scale
    if backend == TORCHVISION:
        tv = _torchvision_roi_pool()
        rois_tv = rois.to(x.dtype)

        def call(inp):
            return tv(inp, rois_tv, size, scale)
    else:

        def call(inp):
            return roi_pool(inp, rois, size, scale, backend=backend)

    if mode == "infer":

        def infer():
            with torch.no_grad():
                return call(x)

        return infer
    leaf = x.detach().requires_grad_(True)
    if mode == "fwd":
        return lambda: call(leaf)
    grad = torch.randn(rois.shape[0], x.shape[1], size, size, device=x.device).to(x.dtype)

    def forward_backward():
        leaf.grad = None
        call(leaf).backward(grad)

    return forward_backward


def run_benchmark(
    device: torch.device,
    dtypes: list[torch.dtype],
    workloads: list[Workload],
    backends: list[str] | None,
    budget_s: float,
    channels_last: bool = False,
    progress: Callable[[str], None] | None = None,
    min_reps: int = 3,
    modes: tuple[str, ...] = MODES,
    queue: int = 1,
) -> tuple[list[Measurement], float]:
    """Time every (workload, dtype, backend, mode). Returns (measurements, copy bandwidth B/s)."""
    bandwidth = copy_bandwidth(device, budget_s)
    results = []
    layout = "channels_last" if channels_last else "contiguous"
    for workload in workloads:
        for dtype in dtypes:
            x = make_input(workload, dtype, device, channels_last=channels_last)
            rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
            rois = make_rois(workload, rois_dtype, device)
            floors = _floor_bytes(workload, x.element_size())
            for backend in _candidates(device, dtype, backends, x, rois, workload):
                m = Measurement(
                    workload.name,
                    workload.describe(),
                    str(device),
                    str(dtype).removeprefix("torch."),
                    backend,
                    layout,
                )
                m.floor_ms = {k: v / bandwidth * 1e3 for k, v in floors.items()}
                for mode in modes:
                    if progress:
                        progress(f"{workload.name} {m.dtype} {backend} {mode}")
                    try:
                        with value_checks(False):
                            fn = _runner(backend, x, rois, workload, mode)
                            m.times_ms[mode] = median_time_ms(
                                fn, device, budget_s, min_reps=min_reps, queue=queue
                            )
                    except Exception as error:  # a rival without this dtype, say
                        m.error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                        break
                results.append(m)
    return results, bandwidth


def value_check_cost_ms(device: torch.device, workload: Workload, budget_s: float) -> float:
    """Median time of the ROI value checks alone for `workload`'s ROIs, in milliseconds."""
    rois = make_rois(workload, torch.float32, device)
    return median_time_ms(lambda: check_roi_values(rois, workload.num_images), device, budget_s)


def format_table(results: list[Measurement]) -> str:
    """A readable table: times, ratios against the torch backend and torchvision, floor share."""
    header = (
        f"{'workload':<10} {'dtype':<9} {'backend':<12} {'infer ms':>9} {'fwd ms':>9} "
        f"{'f+b ms':>9} {'fwd/torch':>9} {'fwd/tv':>7} {'f+b/tv':>7} {'inf/tv':>7} "
        f"{'floor%':>6}"
    )
    lines = [header, "-" * len(header)]
    index = {(m.workload, m.dtype, m.backend): m for m in results}

    def ratio(base: Measurement | None, m: Measurement, mode: str, rival_mode: str | None = None):
        if base is None or mode not in m.times_ms or (rival_mode or mode) not in base.times_ms:
            return "-"
        return f"{base.times_ms[rival_mode or mode] / m.times_ms[mode]:.2f}x"

    for m in results:
        if m.error:
            lines.append(f"{m.workload:<10} {m.dtype:<9} {m.backend:<12} error: {m.error}")
            continue
        torch_m = index.get((m.workload, m.dtype, "torch"))
        tv = index.get((m.workload, m.dtype, TORCHVISION))
        t = m.times_ms
        floor = f"{100 * m.floor_ms['fwd'] / t['fwd']:.0f}" if t.get("fwd") else "-"
        ms = {mode: f"{t[mode]:9.3f}" if mode in t else f"{'-':>9}" for mode in MODES}
        lines.append(
            f"{m.workload:<10} {m.dtype:<9} {m.backend:<12} {ms['infer']} "
            f"{ms['fwd']} {ms['fwd+bwd']} {ratio(torch_m, m, 'fwd'):>9} "
            f"{ratio(tv, m, 'fwd'):>7} {ratio(tv, m, 'fwd+bwd'):>7} "
            f"{ratio(tv, m, 'infer', 'fwd'):>7} {floor:>6}"
        )
    lines.append(
        "ratios are the other's median time over this row's (higher is faster); "
        "inf/tv compares inference with torchvision's forward (it always computes the "
        "argmax); floor% = bytes-moved floor of fwd over measured fwd"
    )
    return "\n".join(lines)


def to_json(results: list[Measurement], bandwidth: float, extra: dict) -> dict:
    """The JSON document written by ``--json``."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "copy_bandwidth_GBps": bandwidth / 1e9,
        **extra,
        "results": [asdict(m) for m in results],
    }


def resolve_workloads(
    names: list[str] | None, device: torch.device, full_size: bool = False
) -> list[Workload]:
    """The named workloads (all by default), scaled down on the CPU unless `full_size`."""
    chosen = [WORKLOADS[n] for n in names] if names else list(WORKLOADS.values())
    return [w.scaled_for_cpu() if device.type == "cpu" and not full_size else w for w in chosen]
