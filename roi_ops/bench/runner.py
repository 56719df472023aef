"""`python -m roi_ops bench`: every usable backend (and torchvision) side by side, median times.

Modes: ``infer`` (no gradient, so no argmax), ``fwd`` (forward of a call that needs a gradient,
argmax included) and ``fwd+bwd``. Calls run at roi_ops' default settings (value checks on), as
users get them; rows labelled ``checks off`` repeat them with ``roi_ops.value_checks(False)``.

CUDA is timed with events after warm-up, each sample covering `queue` calls issued back to back
(ten by default, as a training loop issues them; one for the latency of a synchronised call), the
CPU with a monotonic clock. The floor is the bytes that must move (input read once, output written
once, plus the argmax and gradients where the mode needs them) over the device's measured copy
bandwidth. The per-call host time of a small problem (`SMALL_PROBLEM`) is the host's wall time
over many back-to-back calls with no synchronisation between them.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from ..backend import RoIPoolProblem
from ..config import value_checks
from ..dispatch import reasons_against, resolve_backend
from ..functional import roi_pool
from ..registry import REGISTRY
from .workloads import SMALL_PROBLEM, Workload, make_input, make_rois

if TYPE_CHECKING:
    from .pyramid import PyramidWorkload

MODES = ("infer", "fwd", "fwd+bwd")
TORCHVISION = "torchvision"
AUTO = "auto"
DEFAULT = "default"
CHECKS_OFF = "checks off"
# A measurement whose interquartile range exceeds this share of its median is flagged.
NOISY_SPREAD = 0.25


@dataclass(frozen=True)
class Timing:
    """Summary of repeated samples of one quantity (any unit)."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    reps: int

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0 for a single sample)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        """Median, quartiles and range of `samples` (at least one)."""
        if len(samples) >= 2:
            q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        else:
            q1 = q3 = samples[0]
        return cls(statistics.median(samples), q1, q3, min(samples), max(samples), len(samples))


@dataclass
class Measurement:
    """One (workload, dtype, backend, settings) row: times per mode in milliseconds.

    ``spread_ms[mode]`` is the interquartile range [q1, q3] and ``range_ms[mode]`` [min, max] of
    the samples behind ``times_ms[mode]`` (the median).
    """

    workload: str
    shape: str
    device: str
    dtype: str
    backend: str
    layout: str
    settings: str = DEFAULT
    times_ms: dict[str, float] = field(default_factory=dict)
    spread_ms: dict[str, list[float]] = field(default_factory=dict)
    range_ms: dict[str, list[float]] = field(default_factory=dict)
    reps: dict[str, int] = field(default_factory=dict)
    floor_ms: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        """The backend, with the settings when they are not the defaults."""
        return self.backend if self.settings == DEFAULT else f"{self.backend} [{self.settings}]"

    def record(self, mode: str, timing: Timing) -> None:
        self.times_ms[mode] = timing.median
        self.spread_ms[mode] = [timing.q1, timing.q3]
        self.range_ms[mode] = [timing.low, timing.high]
        self.reps[mode] = timing.reps

    def spread(self, mode: str) -> float:
        """Interquartile range over the median for `mode` (0 when unknown)."""
        if mode not in self.spread_ms or not self.times_ms.get(mode):
            return 0.0
        q1, q3 = self.spread_ms[mode]
        return (q3 - q1) / self.times_ms[mode]


@dataclass
class HostMeasurement:
    """Host microseconds per call of `SMALL_PROBLEM` for one backend and settings."""

    backend: str
    settings: str = DEFAULT
    resolved: str | None = None  # what "auto" picked
    host_us: dict[str, float] = field(default_factory=dict)
    spread_us: dict[str, list[float]] = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        name = f"{self.backend} ({self.resolved})" if self.resolved else self.backend
        return name if self.settings == DEFAULT else f"{name} [{self.settings}]"


@dataclass
class PlannedCase:
    """One (workload, dtype) of a sweep and the backends that will be timed on it."""

    workload: Workload
    dtype: torch.dtype
    backends: list[str]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def row_fields(
    workload: Workload | PyramidWorkload, device: torch.device, dtype: torch.dtype
) -> tuple[str, str, str, str]:
    """The fields every result row begins with: workload name, its shape, device, dtype."""
    return workload.name, workload.describe(), str(device), str(dtype).removeprefix("torch.")


def time_calls(
    fn: Callable[[], object],
    device: torch.device,
    budget_s: float,
    warmup: int = 2,
    min_reps: int = 3,
    max_reps: int = 200,
    queue: int = 1,
) -> Timing:
    """Milliseconds per call of `fn` (CUDA events on GPUs, perf_counter on CPUs).

    Runs `warmup` untimed calls (one if a call takes over a third of the budget), then samples
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
    return Timing.of(samples)


def copy_bandwidth(device: torch.device, budget_s: float) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    elements = 256 * 2**20 // 4  # 256 MiB: well past every cache
    source = torch.randn(elements, device=device)
    target = torch.empty_like(source)
    ms = time_calls(lambda: target.copy_(source), device, budget_s).median
    return 2 * source.numel() * 4 / (ms / 1e3)


def _floor_bytes(workload: Workload, element: int) -> dict[str, int]:
    w = workload
    input_bytes = w.num_images * w.channels * w.height * w.width * element
    outputs = w.num_rois * w.channels * w.output_size**2
    forward = input_bytes + outputs * element
    with_argmax = forward + outputs * 4
    backward = outputs * (element + 4) + input_bytes  # grad_output and argmax in, grad_input out
    return {"infer": forward, "fwd": with_argmax, "fwd+bwd": with_argmax + backward}


def torchvision_roi_pool() -> Callable | None:
    """torchvision.ops.roi_pool, or None when torchvision cannot be imported."""
    try:
        from torchvision.ops import roi_pool as tv_roi_pool
    except Exception:
        return None
    return tv_roi_pool


def rois_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The rois dtype the bench pairs with inputs of `dtype` (float32 for bfloat16)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _probe(
    device: torch.device, dtype: torch.dtype, x: torch.Tensor | None = None
) -> RoIPoolProblem:
    if x is None:
        x = torch.empty((1, 1, 1, 1), dtype=dtype, device=device)
    rois = torch.zeros((1, 5), dtype=rois_dtype_for(dtype), device=device)
    return RoIPoolProblem(x, rois, 1, 1, 1.0, True)


def _declares(entry, device: torch.device) -> bool:
    # As `auto` does: only backends that declare the device type run by default (Triton's CPU
    # interpreter accepts CPU tensors when named, and is timed only then).
    types = entry.backend.device_types if entry.backend is not None else frozenset()
    return "*" in types or device.type in types


def usable_backends(
    device: torch.device, dtype: torch.dtype, names: list[str] | None, x: torch.Tensor | None = None
) -> list[str]:
    """Backends that can run `dtype` on `device`: those in `names` (``auto`` included), or by
    default every registered one that declares the device type; highest priority first, then
    ``torchvision`` when it is importable (and wanted)."""
    problem = _probe(device, dtype, x)
    chosen = []
    if names and AUTO in names:
        try:
            resolve_backend(AUTO, problem)
            chosen.append(AUTO)
        except Exception:
            pass
    chosen += [
        entry.name
        for entry in REGISTRY.entries()
        if (entry.name in names if names else _declares(entry, device))
        and not reasons_against(entry, problem)
    ]
    if (names is None or TORCHVISION in names) and torchvision_roi_pool() is not None:
        chosen.append(TORCHVISION)
    return chosen


def unusable_reasons(name: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why the registered backend `name` (or ``auto``) cannot run `dtype` on `device` (empty:
    it can)."""
    if name == AUTO:
        try:
            resolve_backend(AUTO, _probe(device, dtype))
            return []
        except Exception as error:
            return [_error_text(error)]
    entry = REGISTRY.get(name)
    if entry is None:
        return [f"no backend is registered as {name!r}"]
    return reasons_against(entry, _probe(device, dtype))


def plan_benchmark(
    device: torch.device,
    dtypes: list[torch.dtype],
    workloads: list[Workload],
    backends: list[str] | None,
) -> list[PlannedCase]:
    """The (workload, dtype, backends) a sweep will time, decided before any timing."""
    per_dtype = {dtype: usable_backends(device, dtype, backends) for dtype in dtypes}
    return [PlannedCase(w, d, per_dtype[d]) for w in workloads for d in dtypes]


def _call(backend: str, rois: torch.Tensor, workload: Workload, dtype: torch.dtype):
    size, scale = workload.output_size, workload.spatial_scale
    if backend == TORCHVISION:
        tv = torchvision_roi_pool()
        rois_tv = rois.to(dtype)  # torchvision wants the input's dtype; converted once

        def call(inp):
            return tv(inp, rois_tv, size, scale)

        return call

    def call(inp):
        return roi_pool(inp, rois, size, scale, backend=backend)

    return call


def _runner(
    backend: str, x: torch.Tensor, rois: torch.Tensor, workload: Workload, mode: str
) -> Callable[[], object]:
    call = _call(backend, rois, workload, x.dtype)
    if mode == "infer":

        def infer():
            with torch.no_grad():
                return call(x)

        return infer
    leaf = x.detach().requires_grad_(True)
    if mode == "fwd":
        return lambda: call(leaf)
    size = workload.output_size
    grad = torch.randn(rois.shape[0], x.shape[1], size, size, device=x.device).to(x.dtype)

    def forward_backward():
        leaf.grad = None
        call(leaf).backward(grad)

    return forward_backward


def _settings_context(settings: str):
    return value_checks(False) if settings == CHECKS_OFF else nullcontext()


def _variants(backends: list[str], checks_off: bool) -> list[tuple[str, str]]:
    variants = [(b, DEFAULT) for b in backends]
    if checks_off:
        variants += [(b, CHECKS_OFF) for b in backends if b != TORCHVISION]
    return variants


def count_steps(plan: list[PlannedCase], modes: tuple[str, ...], checks_off: bool = False) -> int:
    """How many timed measurements `run_benchmark` makes for `plan` (for a progress bar)."""
    return sum(len(_variants(case.backends, checks_off)) for case in plan) * len(modes)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def run_benchmark(
    device: torch.device,
    plan: list[PlannedCase],
    budget_s: float,
    channels_last: bool = False,
    progress: Callable[[str], None] | None = None,
    min_reps: int = 3,
    modes: tuple[str, ...] = MODES,
    queue: int = 1,
    checks_off: bool = False,
) -> tuple[list[Measurement], float]:
    """Time every case of `plan` in every mode, at default settings (and with value checks off
    too when `checks_off`). Returns (measurements, copy bandwidth in bytes/s).

    A backend that fails on a case gets a row with ``error`` set; the sweep goes on.
    """
    bandwidth = copy_bandwidth(device, budget_s)
    results = []
    layout = "channels_last" if channels_last else "contiguous"
    for case in plan:
        workload, dtype = case.workload, case.dtype
        x = make_input(workload, dtype, device, channels_last=channels_last)
        rois = make_rois(workload, rois_dtype_for(dtype), device)
        floors = _floor_bytes(workload, x.element_size())
        runnable = set(usable_backends(device, dtype, case.backends, x))
        for backend, settings in _variants(case.backends, checks_off):
            m = Measurement(*row_fields(workload, device, dtype), backend, layout, settings)
            m.floor_ms = {k: v / bandwidth * 1e3 for k, v in floors.items()}
            if backend not in runnable:
                m.error = "cannot run this case: " + "; ".join(
                    unusable_reasons(backend, device, dtype) or ["not usable for this input"]
                )
            for mode in modes:
                if progress:
                    progress(f"{workload.name} {m.dtype} {m.label} {mode}")
                if m.error:
                    continue
                try:
                    with _settings_context(settings):
                        fn = _runner(backend, x, rois, workload, mode)
                        m.record(
                            mode,
                            time_calls(fn, device, budget_s, min_reps=min_reps, queue=queue),
                        )
                except Exception as error:  # a rival without this dtype, say
                    m.error = _error_text(error)
            results.append(m)
        del x, rois
    return results, bandwidth


def host_rows(backends: list[str], named: bool, checks_off: bool) -> list[tuple[str, str]]:
    """(backend, settings) rows of the small-problem host-time table: torchvision, ``auto`` (at
    defaults and with checks off) unless backends were `named`, then each backend (the torch
    backend only when named), with a checks-off twin each when `checks_off`."""
    rows: list[tuple[str, str]] = []
    if TORCHVISION in backends:
        rows.append((TORCHVISION, DEFAULT))
    if not named:
        rows += [(AUTO, DEFAULT), (AUTO, CHECKS_OFF)]
    # The pure-torch fallback only when named: it is what no one runs where another backend is.
    ours = [b for b in backends if b != TORCHVISION and (named or b != "torch")]
    rows += [(b, DEFAULT) for b in ours]
    if checks_off:
        rows += [(b, CHECKS_OFF) for b in ours]
    return rows


def interleaved_host_us(
    fns: list[Callable[[], object]],
    device: torch.device,
    budget_s: float,
    calls: int = 20,
    min_rounds: int = 7,
) -> list[Timing]:
    """Host microseconds per call of each of `fns`, sampled in turn (round-robin), so that a
    machine's drift and noise fall on every row alike. A sample issues `calls` back-to-back calls
    with nothing synchronising between them; the device is drained after each sample (untimed).
    """
    for fn in fns:  # warm-up: compile, allocate, fill caches
        fn()
        fn()
    _sync(device)
    samples: list[list[float]] = [[] for _ in fns]
    started = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or time.perf_counter() - started < budget_s * len(fns):
        for index, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[index].append((time.perf_counter() - t0) / calls * 1e6)
            _sync(device)
        rounds += 1
        if rounds >= 500:
            break
    return [Timing.of(s) for s in samples]


def run_host_overhead(
    device: torch.device,
    rows: list[tuple[str, str]],
    budget_s: float,
    modes: tuple[str, ...] = MODES,
    progress: Callable[[str], None] | None = None,
) -> list[HostMeasurement]:
    """Host microseconds per call of `SMALL_PROBLEM` (float32) for each (backend, settings),
    the rows of one mode sampled in turn (`interleaved_host_us`)."""
    workload = SMALL_PROBLEM
    x = make_input(workload, torch.float32, device)
    rois = make_rois(workload, torch.float32, device)
    results = [HostMeasurement(backend, settings) for backend, settings in rows]
    for m in results:
        if m.backend == AUTO:
            try:
                size = workload.output_size
                problem = RoIPoolProblem(x, rois, size, size, workload.spatial_scale, True)
                m.resolved = resolve_backend(AUTO, problem).name
            except Exception as error:
                m.error = _error_text(error)
    for mode in modes:
        live = []
        for m in results:
            if progress:
                progress(f"small problem {m.label} {mode}")
            if m.error:
                continue
            run = _runner(m.backend, x, rois, workload, mode)
            settings = m.settings

            def in_settings(run=run, settings=settings):
                with _settings_context(settings):
                    return run()

            try:
                in_settings()
            except Exception as error:
                m.error = _error_text(error)
                continue
            live.append((m, in_settings))
        if not live:
            continue
        timings = interleaved_host_us([fn for _, fn in live], device, budget_s)
        for (m, _), timing in zip(live, timings, strict=True):
            m.host_us[mode] = timing.median
            m.spread_us[mode] = [timing.q1, timing.q3]
    return results


def _cell(median: float | None, spread: float, width: int = 15, digits: int = 3) -> str:
    if median is None:
        return f"{'-':>{width}}"
    flag = "!" if spread > NOISY_SPREAD else " "
    return f"{median:.{digits}f} ({100 * spread:.0f}%){flag}".rjust(width)


def format_table(results: list[Measurement]) -> str:
    """A readable table: median times with their spread, ratios against torchvision (and the torch
    backend), and the share of the bytes-moved floor."""
    header = (
        f"{'workload':<10} {'dtype':<9} {'backend':<22} {'infer ms':>15} {'fwd ms':>15} "
        f"{'fwd+bwd ms':>15} {'inf/tv':>7} {'fwd/tv':>7} {'f+b/tv':>7} {'fwd/torch':>9} "
        f"{'floor%':>6}"
    )
    lines = [header, "-" * len(header)]
    index = {(m.workload, m.dtype, m.backend, m.settings): m for m in results}

    def ratio(base: Measurement | None, m: Measurement, mode: str) -> str:
        if base is None or mode not in m.times_ms or mode not in base.times_ms:
            return "-"
        return f"{base.times_ms[mode] / m.times_ms[mode]:.2f}x"

    noisy = 0
    for m in results:
        if m.error:
            lines.append(f"{m.workload:<10} {m.dtype:<9} {m.label:<22} error: {m.error}")
            continue
        torch_m = index.get((m.workload, m.dtype, "torch", DEFAULT))
        tv = index.get((m.workload, m.dtype, TORCHVISION, DEFAULT))
        t = m.times_ms
        noisy += any(m.spread(mode) > NOISY_SPREAD for mode in t)
        floor = f"{100 * m.floor_ms['fwd'] / t['fwd']:.0f}" if t.get("fwd") and m.floor_ms else "-"
        cells = " ".join(_cell(t.get(mode), m.spread(mode)) for mode in MODES)
        lines.append(
            f"{m.workload:<10} {m.dtype:<9} {m.label:<22} {cells} "
            f"{ratio(tv, m, 'infer'):>7} {ratio(tv, m, 'fwd'):>7} {ratio(tv, m, 'fwd+bwd'):>7} "
            f"{ratio(torch_m, m, 'fwd'):>9} {floor:>6}"
        )
    lines.append(
        "times: median ms per call (interquartile range as % of the median); ratios: the other's "
        "median over this row's (higher is faster), each mode against the same mode; "
        "floor% = bytes-moved floor of fwd over measured fwd"
    )
    if noisy:
        lines.append(noise_warning(noisy))
    return "\n".join(lines)


def noise_warning(count: int) -> str:
    """The warning printed under a table with `count` noisy rows."""
    return (
        f"warning: {count} row(s) marked ! have an interquartile range over "
        f"{100 * NOISY_SPREAD:.0f}% of the median: the machine was busy or the clock noisy, so "
        "those medians are unreliable; rerun on an idle machine or with a larger --budget"
    )


def format_host_table(results: list[HostMeasurement], device: torch.device) -> str:
    """The small problem's host microseconds per call, with each row's ratio to torchvision's."""
    header = (
        f"{'backend':<28} {'infer us':>13} {'fwd us':>13} {'fwd+bwd us':>13} "
        f"{'inf/tv':>7} {'fwd/tv':>7} {'f+b/tv':>7}"
    )
    how = (
        "calls issued back to back, no sync between them" if device.type == "cuda" else "wall time"
    )
    lines = [
        f"host time per call, small problem ({SMALL_PROBLEM.describe()}, float32; {how})",
        header,
        "-" * len(header),
    ]
    tv = next((m for m in results if m.backend == TORCHVISION and not m.error), None)
    noisy = 0
    for m in results:
        if m.error:
            lines.append(f"{m.label:<28} error: {m.error}")
            continue
        spreads = {}
        for mode, (q1, q3) in m.spread_us.items():
            spreads[mode] = (q3 - q1) / m.host_us[mode] if m.host_us[mode] else 0.0
        noisy += any(s > NOISY_SPREAD for s in spreads.values())
        cells = " ".join(
            _cell(m.host_us.get(mode), spreads.get(mode, 0.0), width=13, digits=0) for mode in MODES
        )
        ratios = " ".join(
            f"{m.host_us[mode] / tv.host_us[mode]:.2f}x".rjust(7)
            if tv is not None and mode in m.host_us and mode in tv.host_us
            else f"{'-':>7}"
            for mode in MODES
        )
        lines.append(f"{m.label:<28} {cells} {ratios}")
    lines.append(
        "host us: median microseconds per call (interquartile range %); ratios: this row's time "
        "over torchvision's (lower is better)"
    )
    if noisy:
        lines.append(noise_warning(noisy))
    return "\n".join(lines)


def to_json(
    results: list[Measurement],
    bandwidth: float,
    extra: dict,
    host: list[HostMeasurement] | None = None,
) -> dict:
    """The JSON document written by ``--json``."""
    document = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "copy_bandwidth_GBps": bandwidth / 1e9,
        **extra,
        "results": [asdict(m) for m in results],
    }
    if host is not None:
        document["small_problem"] = {
            "shape": SMALL_PROBLEM.describe(),
            "dtype": "float32",
            "results": [asdict(m) for m in host],
        }
    return document
