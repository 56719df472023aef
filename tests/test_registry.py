"""Registry, discovery through real entry-point metadata, resolution and plugin isolation."""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TorchKernels

import roi_ops
from roi_ops.registry import REGISTRY
from roi_ops.testing import check_case, contract_cases
from roi_ops.testing.reference import reference_roi_pool, reference_roi_pool_backward

EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin"


def _install_distribution(
    root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str] | None = None
) -> None:
    """Write `modules` and a real .dist-info with `entry_points` under `root` (on sys.path)."""
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(source)
    info = root / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[roi_ops.backends]\n{lines}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fresh site directory on sys.path; the registry rediscovers before and after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    REGISTRY.reset()
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(("roi_ops_example", "plugin_")):
            del sys.modules[name]
    REGISTRY.reset()


@pytest.fixture
def example_plugin(site):
    """The repository's example plugin, exposed through real entry-point metadata."""
    shutil.copytree(EXAMPLE_PLUGIN / "roi_ops_example", site / "roi_ops_example")
    _install_distribution(
        site, "roi-ops-example", {"example": "roi_ops_example.backend:ExampleBackend"}
    )
    return site


def _listed_with_warning(match: str) -> dict:
    """`roi_ops.list_backends()` by name; listing must warn (RuntimeWarning) with `match`."""
    with pytest.warns(RuntimeWarning, match=match):
        return {i.name: i for i in roi_ops.list_backends()}


def _x_rois(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 9, generator=g)
    rois = torch.tensor([[0, 0.0, 0, 5, 6], [1, 2.0, 1, 8, 7]])
    return x, rois


def test_torch_backend_is_registered_through_the_entry_point_group():
    info = {i.name: i for i in roi_ops.list_backends()}["torch"]
    assert info.origin == "entry point"
    assert info.distribution == "roi-ops"
    assert info.available and info.device_types == ("*",)


def test_example_plugin_is_discovered_listed_and_selectable(example_plugin, monkeypatch):
    info = {i.name: i for i in roi_ops.list_backends()}
    assert info["example"].distribution == "roi-ops-example"
    assert info["example"].version == "0.1.0"
    x, rois = _x_rois()
    expected = roi_ops.roi_pool(x, rois, 3, backend="torch")
    chosen = []
    original = REGISTRY.get("example").backend.forward

    def spy(problem, output, argmax):
        chosen.append("example")
        original(problem, output, argmax)

    monkeypatch.setattr(REGISTRY.get("example").backend, "forward", spy)
    assert torch.equal(roi_ops.roi_pool(x, rois, 3, backend="example"), expected)
    with roi_ops.use_backend("example"):
        assert torch.equal(roi_ops.roi_pool(x, rois, 3), expected)
    monkeypatch.setenv("ROI_OPS_BACKEND", "example")
    assert torch.equal(roi_ops.roi_pool(x, rois, 3), expected)
    assert chosen == ["example"] * 3


def test_example_plugin_conforms(example_plugin):
    for dtype in (torch.float32, torch.float16):
        for case in contract_cases("cpu", dtype):
            check_case(case, "example")


def test_broken_plugin_is_isolated_and_warns_once(site):
    _install_distribution(
        site,
        "plugin-broken",
        {"broken": "plugin_broken:Backend"},
        {"plugin_broken": "raise ImportError('kernel library missing')\n"},
    )
    infos = _listed_with_warning("kernel library missing")
    assert not infos["broken"].available
    assert "ImportError: kernel library missing" in infos["broken"].reasons[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        roi_ops.list_backends()
    x, rois = _x_rois()
    assert roi_ops.roi_pool(x, rois, 2).shape == (2, 3, 2, 2)
    with pytest.raises(roi_ops.BackendUnavailableError, match="kernel library missing"):
        roi_ops.roi_pool(x, rois, 2, backend="broken")


PLUGIN_SOURCE = """
import roi_ops
from roi_ops.torch_backend import TorchBackend

class Failing(roi_ops.Backend):
    name = "{name}"
    priority = 1000
    device_types = frozenset({{"cpu"}})

    def check_available(self):
        {check}

    def forward(self, problem, output, argmax):
        {forward}
"""


def _plugin(
    site,
    name,
    check="return None",
    forward="raise ValueError('kernel exploded')",
    *,
    entry_point=None,
    backend_name=None,
):
    """Install the distribution plugin-`name`: module plugin_`name` defines PLUGIN_SOURCE's
    backend, named `backend_name`, under the entry point `entry_point` (both default to
    `name`)."""
    module = f"plugin_{name}"
    source = PLUGIN_SOURCE.format(name=backend_name or name, check=check, forward=forward)
    _install_distribution(
        site, f"plugin-{name}", {entry_point or name: f"{module}:Failing"}, {module: source}
    )


def test_plugin_whose_availability_check_raises_is_unavailable(site):
    _plugin(site, "flaky", check="raise RuntimeError('driver too old')")
    infos = _listed_with_warning("driver too old")
    assert not infos["flaky"].available
    x, rois = _x_rois()
    assert roi_ops.roi_pool(x, rois, 2).shape == (2, 3, 2, 2)  # auto skips it


def test_plugin_that_raises_at_call_time_is_named(site):
    _plugin(site, "exploding")
    x, rois = _x_rois()
    with pytest.raises(roi_ops.BackendError, match="'exploding' failed in forward.*exploded"):
        roi_ops.roi_pool(x, rois, 2)  # highest priority, so auto picks it
    assert roi_ops.roi_pool(x, rois, 2, backend="torch").shape == (2, 3, 2, 2)


def test_plugin_with_mismatched_name_is_rejected(site):
    _plugin(site, "misnamed", forward="pass", backend_name="other")
    infos = _listed_with_warning("differs from the backend's name")
    assert not infos["misnamed"].available


def test_two_plugins_cannot_share_a_name_silently(site):
    for dist in ("plugin-one", "plugin-two"):
        _install_distribution(site, dist, {"twin": "roi_ops.torch_backend:TorchBackend"})
    infos = _listed_with_warning("claimed by several plugins")
    assert not infos["twin"].available
    x, rois = _x_rois()
    with pytest.raises(roi_ops.BackendUnavailableError, match="claimed by several"):
        roi_ops.roi_pool(x, rois, 2, backend="twin")


def test_a_plugin_cannot_replace_the_core_torch_backend(site):
    _plugin(site, "impostor", forward="raise ValueError", entry_point="torch", backend_name="torch")
    infos = _listed_with_warning("the core's wins")
    assert infos["torch"].distribution == "roi-ops"


class Tiny(TorchKernels):
    name = "tiny"
    priority = 5


@pytest.fixture
def tiny():
    REGISTRY.reset()
    roi_ops.register_backend(Tiny)
    yield
    REGISTRY.reset()


def test_register_backend_refuses_clashes_unless_replacing(tiny):
    with pytest.raises(ValueError, match="'tiny' is already registered"):
        roi_ops.register_backend(Tiny())
    roi_ops.register_backend(Tiny(), replace=True)
    with pytest.raises(ValueError, match="'torch' is already registered"):
        roi_ops.register_backend(type("T", (Tiny,), {"name": "torch"}))
    with pytest.raises(TypeError, match="expected a roi_ops.Backend"):
        roi_ops.register_backend(object())
    roi_ops.unregister_backend("tiny")
    assert "tiny" not in [i.name for i in roi_ops.list_backends()]


def test_auto_picks_highest_priority_usable(tiny):
    x, rois = _x_rois()
    problem = roi_ops.RoIPoolProblem(x.double(), rois.double(), 2, 2, 1.0, False)
    best = max(
        (
            i
            for i in roi_ops.list_backends()
            if i.available and ("cpu" in i.device_types or "*" in i.device_types)
        ),
        key=lambda i: i.priority,
    )
    assert roi_ops.resolve_backend("auto", problem).name == best.name
    float32_problem = roi_ops.RoIPoolProblem(x, rois, 2, 2, 1.0, False)
    assert roi_ops.resolve_backend("tiny,torch", float32_problem).name == "torch"
    assert roi_ops.resolve_backend("tiny,torch", problem).name == "tiny"


def test_named_backend_never_falls_back_silently(tiny):
    x, rois = _x_rois()
    with pytest.raises(roi_ops.BackendUnavailableError) as error:
        roi_ops.roi_pool(x, rois, 2, backend="tiny")
    message = str(error.value)
    assert "dtype float32 not supported (supports: float64)" in message
    assert "torch (priority 0): usable" in message  # every backend is listed


def test_unknown_backend_lists_known_names(monkeypatch):
    x, rois = _x_rois()
    with pytest.raises(roi_ops.BackendNotFoundError, match="known backends: auto, .*torch"):
        roi_ops.roi_pool(x, rois, 2, backend="nope")
    monkeypatch.setenv("ROI_OPS_BACKEND", "nope")
    with pytest.raises(roi_ops.BackendNotFoundError, match="ROI_OPS_BACKEND"):
        roi_ops.roi_pool(x, rois, 2)


def test_resolution_precedence(tiny, monkeypatch):
    x, rois = _x_rois()
    problem = roi_ops.RoIPoolProblem(x.double(), rois.double(), 2, 2, 1.0, False)
    monkeypatch.setenv("ROI_OPS_BACKEND", "torch")  # read at call time, not at import
    assert roi_ops.resolve_backend("auto", problem).name == "torch"
    with roi_ops.use_backend("tiny"):
        assert roi_ops.resolve_backend("auto", problem).name == "tiny"
        with roi_ops.use_backend("torch"):
            assert roi_ops.resolve_backend("auto", problem).name == "torch"
        assert roi_ops.resolve_backend("auto", problem).name == "tiny"
        assert roi_ops.resolve_backend("torch", problem).name == "torch"  # argument wins
    monkeypatch.delenv("ROI_OPS_BACKEND")
    assert roi_ops.resolve_backend("torch", problem).name == "torch"


def test_use_backend_is_thread_and_task_safe(tiny):
    x, rois = _x_rois()
    problem = roi_ops.RoIPoolProblem(x.double(), rois.double(), 2, 2, 1.0, False)
    seen: dict[str, list[str]] = {"tiny": [], "torch": []}
    barrier = threading.Barrier(8)

    def worker(name):
        with roi_ops.use_backend(name):
            barrier.wait()
            for _ in range(50):
                seen[name].append(roi_ops.resolve_backend("auto", problem).name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ["tiny", "torch"] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen["tiny"]) == {"tiny"} and set(seen["torch"]) == {"torch"}

    async def task(name):
        with roi_ops.use_backend(name):
            await asyncio.sleep(0)
            return roi_ops.resolve_backend("auto", problem).name

    async def both():
        return await asyncio.gather(task("tiny"), task("torch"))

    assert asyncio.run(both()) == ["tiny", "torch"]


def test_backend_choice_is_not_baked_into_compiled_graphs(tiny, monkeypatch):
    x, rois = _x_rois()
    x, rois = x.double(), rois.double()
    calls = []
    backend = REGISTRY.get("tiny").backend
    original = backend.forward
    monkeypatch.setattr(backend, "forward", lambda *a: (calls.append(1), original(*a))[1])
    compiled = torch.compile(lambda a, b: roi_ops.roi_pool(a, b, 2), fullgraph=True)
    monkeypatch.setenv("ROI_OPS_BACKEND", "torch")
    first = compiled(x, rois)
    assert calls == []
    monkeypatch.setenv("ROI_OPS_BACKEND", "tiny")
    assert torch.equal(compiled(x, rois), first)
    assert calls == [1]


class Misbehaving(Tiny):
    name = "misbehaving"
    dtypes = frozenset({torch.float32})
    result = "forward"

    def forward(self, problem, output, argmax):
        super().forward(problem, output, argmax)
        return output if self.result == "forward" else None

    def backward(self, problem):
        shapes = {"shape": (1, 1, 1, 1)}
        dtypes = {"dtype": torch.float64}
        device = "meta" if self.result == "device" else problem.device
        return torch.zeros(
            shapes.get(self.result, problem.input_shape),
            dtype=dtypes.get(self.result, problem.input_dtype),
            device=device,
        )


@pytest.mark.parametrize(
    "result,message",
    [
        ("forward", r"'misbehaving': forward returned Tensor; it must fill the output buffers"),
        ("shape", r"'misbehaving': backward returned a \(1, 1, 1, 1\) torch.float32 tensor"),
        ("dtype", r"'misbehaving': backward returned a \(2, 3, 8, 9\) torch.float64"),
        ("device", r"'misbehaving': backward returned .* on meta, expected"),
    ],
)
def test_misbehaving_plugin_results_are_named_errors(tiny, result, message):
    backend = roi_ops.register_backend(Misbehaving())
    backend.result = result
    x, rois = _x_rois()
    x.requires_grad_(True)
    with pytest.raises(roi_ops.BackendError, match=message):
        roi_ops.roi_pool(x, rois, 2, backend="misbehaving").sum().backward()
    assert roi_ops.roi_pool(x, rois, 2, backend="torch").shape == (2, 3, 2, 2)


class GradientLayouts(Tiny):
    """A float32 plugin whose backward records what it was asked and returns `layout`."""

    name = "layouts"
    dtypes = frozenset({torch.float32})
    gradient_formats = frozenset({torch.contiguous_format, torch.channels_last})
    layout = "asked"  # "asked": the format it was asked for; "contiguous": always contiguous

    def __init__(self):
        self.asked = []
        self.returned = []

    def backward(self, problem):
        from roi_ops.scatter import scatter_backward

        self.asked.append(problem.memory_format)
        memory_format = torch.contiguous_format
        if self.layout == "asked":
            memory_format = problem.memory_format
        grad = scatter_backward(
            problem.grad_output,
            problem.argmax,
            problem.batch_index,
            problem.input_shape,
            problem.input_dtype,
            memory_format,
        )
        self.returned.append(
            (grad.data_ptr(), grad.stride())
        )  # no reference: autograd may steal it
        return grad


class ContiguousOnly(GradientLayouts):
    """A plugin whose gradient_formats lists only contiguous_format."""

    name = "contiguous-only"
    gradient_formats = frozenset({torch.contiguous_format})


def _channels_last_gradient(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient through `backend` of a channels_last input, the scalar reference's)."""
    x, rois = _x_rois()
    leaf = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad_output = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2) - 5
    roi_ops.roi_pool(leaf, rois, 2, backend=backend).backward(grad_output)
    _, argmax = reference_roi_pool(x, rois, (2, 2), 1.0)
    expected = reference_roi_pool_backward(grad_output, argmax, rois, tuple(x.shape))
    assert bool(expected.ne(0).sum() > 6)  # real sums, not zeros
    return leaf.grad, expected.to(torch.float32)


def test_channels_last_gradient_is_asked_of_backends_that_list_it(tiny, call_path):
    backend = roi_ops.register_backend(GradientLayouts())
    grad, expected = _channels_last_gradient("layouts")
    assert backend.asked == [torch.channels_last]
    assert grad.is_contiguous(memory_format=torch.channels_last) and torch.equal(grad, expected)
    if call_path == "eager":  # autograd kept the backend's tensor: no copy into the input's layout
        assert grad.data_ptr() == backend.returned[0][0]


def test_backends_that_do_not_list_channels_last_get_their_gradient_copied(tiny):
    backend = roi_ops.register_backend(ContiguousOnly())
    grad, expected = _channels_last_gradient("contiguous-only")
    assert backend.asked == [torch.contiguous_format]
    assert backend.returned[0][1] == (216, 72, 9, 1)  # contiguous
    assert grad.is_contiguous(memory_format=torch.channels_last) and torch.equal(grad, expected)


def test_a_backend_may_decline_the_channels_last_gradient(tiny):
    """Asked for channels_last, a backend may return a contiguous gradient (where its own
    channels_last scatter would be slower): roi_ops copies it into the input's layout."""
    backend = roi_ops.register_backend(GradientLayouts())
    backend.layout = "contiguous"
    grad, expected = _channels_last_gradient("layouts")
    assert backend.asked == [torch.channels_last]
    assert backend.returned[0][1] == (216, 72, 9, 1)  # contiguous
    assert grad.is_contiguous(memory_format=torch.channels_last) and torch.equal(grad, expected)
