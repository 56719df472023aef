"""The cupy backend: packaging, availability and the kernel source without a GPU; the kernels
themselves bit for bit against the scalar reference, on a CPU emulator of roi_pool.cu everywhere
and through CuPy on a CUDA device; streams, torchvision and roi_ops.roi_pool on a CUDA device.

roi_ops' conformance kit runs this backend too, from tests/test_conformance.py."""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import math
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

cupy_backend = pytest.importorskip("roi_ops_cupy.backend")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from roi_ops_cupy import kernels  # noqa: E402

from roi_ops.backend import ALL_FLOAT_DTYPES, RoIPoolProblem  # noqa: E402
from roi_ops.testing.cases import contract_cases, tie_heavy_features  # noqa: E402
from roi_ops.testing.reference import (  # noqa: E402
    backward_error_bound,
    reference_roi_pool,
    reference_roi_pool_backward,
)
from roi_ops.testing.strategies import roi_pool_cases  # noqa: E402

CupyBackend = cupy_backend.CupyBackend

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "backends" / "cupy"
SOURCE = PLUGIN_DIR / "roi_ops_cupy" / "roi_pool.cu"
EMULATOR_SOURCE = PLUGIN_DIR / "tools" / "host_emulator.cpp"
CHECK_COMPILE = PLUGIN_DIR / "tools" / "check_compile.sh"

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["float16", "bfloat16", "float32", "float64"]
# channels_last takes the cvec kernel (16-byte aligned channel vectors); shifted by one element
# it takes the chan kernel.
LAYOUTS = ["contiguous", "channels_last", "channels_last_unaligned", "strided"]
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_GUARD = 64  # elements of sentinel before and after every buffer a kernel touches
HAS_CUDA = torch.cuda.is_available()


# ---- Without a GPU: packaging, availability, the source -------------------------------------


def test_entry_point_declared_in_installed_metadata():
    try:
        dist = metadata.distribution("roi-ops-cupy")
    except metadata.PackageNotFoundError:
        pytest.skip("roi-ops-cupy is not installed (pip install -e backends/cupy)")
    points = [ep for ep in dist.entry_points if ep.group == "roi_ops.backends"]
    assert [(ep.name, ep.value) for ep in points] == [("cupy", "roi_ops_cupy.backend:CupyBackend")]
    assert points[0].load() is CupyBackend
    requires = " ".join(dist.requires or [])
    assert "roi-ops" in requires and "cupy-cuda" in requires


def test_backend_declaration():
    backend = CupyBackend()
    assert backend.name == "cupy"
    assert backend.priority == 110
    assert backend.device_types == frozenset({"cuda"})
    assert backend.dtypes == ALL_FLOAT_DTYPES
    assert backend.deterministic is True
    assert kernels.source().startswith("// RoI max pooling")  # shipped as package data


def test_registry_reports_cupy_with_its_availability():
    import roi_ops

    infos = {info.name: info for info in roi_ops.list_backends()}
    assert "cupy" in infos
    reason = CupyBackend().check_available()
    assert infos["cupy"].available == (reason is None)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")
def test_check_available_reports_missing_cuda():
    reason = CupyBackend().check_available()
    assert isinstance(reason, str) and "no CUDA device" in reason


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout.strip()


def test_check_available_without_cupy():
    out = _run_python(
        "import sys; sys.modules['cupy'] = None\n"
        "from roi_ops_cupy.backend import CupyBackend\n"
        "print(CupyBackend().check_available())"
    )
    assert out.startswith("CuPy is not installed") and "cupy-cuda" in out


def test_check_available_with_broken_cupy():
    out = _run_python(
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cupy': raise OSError('libcudart.so: cannot open shared object')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "from roi_ops_cupy.backend import CupyBackend\n"
        "print(CupyBackend().check_available())"
    )
    assert out.startswith("CuPy cannot be imported (OSError: libcudart.so")


def test_importing_the_backend_does_not_import_cupy():
    out = _run_python(
        "import sys, torch\n"
        "import roi_ops_cupy\n"
        "from roi_ops_cupy.backend import CupyBackend\n"
        "from roi_ops.backend import RoIPoolProblem\n"
        "p = RoIPoolProblem(torch.ones(1, 1, 2, 2), torch.zeros(1, 5), 1, 1, 1.0, True)\n"
        "CupyBackend().not_supported_reasons(p)\n"
        "print('cupy' in sys.modules, 'roi_ops_cupy.launch' in sys.modules)"
    )
    assert out == "False False"


def test_not_supported_reasons():
    backend = CupyBackend()
    x = torch.ones(1, 2, 3, 3)
    reasons = backend.not_supported_reasons(RoIPoolProblem(x, torch.zeros(1, 5), 2, 2, 1.0, True))
    assert any("device type 'cpu'" in r for r in reasons)
    huge = RoIPoolProblem(x, torch.zeros(1, 5), 2**16, 2**15, 1.0, True)
    assert any("bins per ROI" in r for r in backend.not_supported_reasons(huge))
    mixed = RoIPoolProblem(x, torch.zeros(1, 5, dtype=torch.float64), 2, 2, 1.0, True)
    assert any("rois dtype float64" in r for r in backend.not_supported_reasons(mixed))


def test_forward_pairs_are_the_contracts():
    allowed = {(d, d) for d in DTYPES} | {(torch.float16, torch.float32)}
    allowed |= {(torch.bfloat16, torch.float32)}
    assert set(kernels.FORWARD_PAIRS) == allowed
    assert set(kernels.BACKWARD_TYPES) == set(DTYPES)


def test_source_instantiations_match_the_dtype_table():
    text = SOURCE.read_text()
    pairs = re.findall(r"^ROI_OPS_FORWARD_PAIR\((\w+), (\w+)\)$", text, re.MULTILINE)
    types = re.findall(r"^ROI_OPS_BACKWARD_TYPE\((\w+)\)$", text, re.MULTILINE)
    table = kernels.C_TYPES
    assert sorted(pairs) == sorted((table[t], table[r]) for t, r in kernels.FORWARD_PAIRS)
    assert sorted(types) == sorted(table[t] for t in kernels.BACKWARD_TYPES)
    for name in (*kernels.FORWARD_KERNELS, *kernels.BACKWARD_KERNELS):
        bounds = r"(ROI_OPS_LAUNCH_BOUNDS|__launch_bounds__\((256|kBlock), [^)]+\))"
        assert re.search(rf"__global__ void {bounds}\s+{name}\(", text), name
    # Every name expression NVRTC is asked for is a template with the instantiated arguments.
    for t, r in kernels.FORWARD_PAIRS:
        for expr in kernels.forward_names(t, r):
            assert re.fullmatch(
                r"roi_pool_forward_(plane|chan|unit|cvec)<\w+, \w+, (true|false)>", expr
            )
    assert kernels.backward_names(torch.bfloat16) == (
        "roi_pool_backward_atomic<roi_bf16>",
        "roi_pool_backward_planes<roi_bf16, 256>",
        "roi_pool_backward_planes<roi_bf16, 1024>",
    )


def test_source_is_self_contained_for_nvrtc():
    assert not re.search(r"^\s*#\s*include", SOURCE.read_text(), re.MULTILINE)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_compile_check_script_passes():
    result = subprocess.run(
        ["bash", str(CHECK_COMPILE)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_compile: all ok (80 90)" in result.stdout
    resources = [line for line in result.stdout.splitlines() if line.startswith("  sm_90 ")]
    backward = sum(len(kernels.backward_names(t)) for t in kernels.BACKWARD_TYPES)
    expected = len(kernels.FORWARD_PAIRS) * 2 * len(kernels.FORWARD_KERNELS) + backward
    assert len(resources) == expected
    assert all("0 B spill stores, 0 B spill loads" in line for line in resources)


def _nvrtc_reason() -> str | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as error:
        return f"NVRTC unavailable ({type(error).__name__}: {error})"
    return None


def test_nvrtc_compiles_every_module_through_cupy():
    """The run-time build: CuPy's NVRTC path, every module, sm_80 and sm_90 (no GPU needed)."""
    reason = _nvrtc_reason()
    if reason is not None:
        pytest.skip(reason)
    out = _run_python(
        "import cupy.cuda.compiler as compiler\n"
        "from roi_ops_cupy import kernels\n"
        "# Without a device CuPy cannot look up the architecture: name it.\n"
        "def arch_options(arch=None):\n"
        "    return f'-arch=sm_{arch}', 'cubin'\n"
        "compiler._get_arch_for_options_for_nvrtc = arch_options\n"
        "options = kernels.COMPILE_OPTIONS + ('-ftz=true',)  # RawModule adds -ftz=true\n"
        "groups = [kernels.forward_names(t, r) for t, r in kernels.FORWARD_PAIRS]\n"
        "groups.append(sum((kernels.backward_names(t) for t in kernels.BACKWARD_TYPES), ()))\n"
        "for arch in ('80', '90'):\n"
        "    for names in groups:\n"
        "        binary, mapping = compiler.compile_using_nvrtc(\n"
        "            kernels.source(), options, arch, name_expressions=names)\n"
        "        assert binary and sorted(mapping) == sorted(names), mapping\n"
        "print('compiled', 2 * len(groups))"
    )
    assert out == f"compiled {2 * (len(kernels.FORWARD_PAIRS) + 1)}"


@pytest.mark.parametrize(
    "defines",
    ["-DROI_OPS_NO_STREAMING_STORES", "-DROI_OPS_UNIT_CHANNELS=8 -DROI_OPS_UNIT_MIN_BLOCKS=2"],
)
def test_nvrtc_compiles_the_tuning_variants(defines, monkeypatch):
    """The -D knobs of ROI_OPS_CUPY_DEFINES (tuning runs) also build with NVRTC (sm_90)."""
    reason = _nvrtc_reason()
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv(kernels.DEFINES_ENV, defines)
    out = _run_python(
        "import cupy.cuda.compiler as compiler\n"
        "from roi_ops_cupy import kernels\n"
        "def arch_options(arch=None):\n"
        "    return f'-arch=sm_{arch}', 'cubin'\n"
        "compiler._get_arch_for_options_for_nvrtc = arch_options\n"
        "options = kernels.compile_options() + ('-ftz=true',)\n"
        "for pair in kernels.FORWARD_PAIRS[:4]:\n"
        "    names = kernels.forward_names(*pair)\n"
        "    binary, mapping = compiler.compile_using_nvrtc(\n"
        "        kernels.source(), options, '90', name_expressions=names)\n"
        "    assert binary and sorted(mapping) == sorted(names), mapping\n"
        "print('compiled', options[-2])"
    )
    assert out == f"compiled {defines.split()[-1]}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_plans_replace_exactly_the_pointer_arguments(layout):
    launch = pytest.importorskip("roi_ops_cupy.launch")
    x = _place_input(torch.randn(2, 20, 9, 11), layout, "cpu")
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 7.0]] * 3)
    problem = RoIPoolProblem(x, rois, 3, 3, 0.5, True)
    out = torch.empty(problem.output_shape)
    arg = torch.empty(problem.output_shape, dtype=torch.int32)
    plan = kernels.plan_forward(problem, out, arg, 132, 50 * 2**20)
    pointers = [x.data_ptr(), rois.data_ptr(), out.data_ptr(), arg.data_ptr()]
    assert [int(plan.args[i]) for i in launch._POINTER_ARGS] == pointers
    others = [a for i, a in enumerate(plan.args) if i not in launch._POINTER_ARGS]
    assert not any(int(a) in pointers for a in others if isinstance(a, np.integer))


@pytest.mark.parametrize("kernel", kernels.BACKWARD_KERNELS)
def test_cached_backward_plans_replace_exactly_the_pointer_arguments(kernel):
    launch = pytest.importorskip("roi_ops_cupy.launch")
    grad_output = torch.randn(3, 20, 3, 3)
    argmax = torch.zeros(3, 20, 3, 3, dtype=torch.int32)
    batch_index = torch.zeros(3, dtype=torch.int64)
    grad_input = torch.zeros(2, 20, 9, 11)
    plan = kernels.plan_backward(grad_output, argmax, batch_index, grad_input, 132, 0, kernel)
    assert plan.name == kernels.backward_name(kernel, torch.float32)
    pointers = [t.data_ptr() for t in (grad_output, argmax, batch_index, grad_input)]
    assert [int(plan.args[i]) for i in launch._BACKWARD_POINTER_ARGS] == pointers
    others = [a for i, a in enumerate(plan.args) if i not in launch._BACKWARD_POINTER_ARGS]
    assert not any(int(a) in pointers for a in others if isinstance(a, np.integer))


def test_backward_kernel_choice(monkeypatch):
    choose = kernels.backward_kernel
    planes, atomic = kernels.BACKWARD_PLANES, kernels.BACKWARD_ATOMIC
    optin = 227 * 1024
    frcnn = ((2, 1024, 38, 63), torch.float32, (512, 1024, 7, 7), 132, optin)
    assert choose(*frcnn) == planes
    assert choose((2, 1024, 38, 63), torch.float16, (512, 1024, 14, 14), 132, optin) == planes
    # a 200 x 272 float32 plane (218 KB) fits: one block of 1024 threads per SM
    assert choose((8, 256, 200, 272), torch.float32, (4096, 256, 7, 7), 132, optin) == planes
    assert choose((8, 256, 200, 272), torch.float32, (4096, 256, 7, 7), 132, 99 * 1024) == atomic
    assert choose((1, 16, 38, 63), torch.float32, (512, 16, 7, 7), 132, optin) == atomic  # few
    assert choose((2, 1024, 38, 63), torch.float32, (0, 1024, 7, 7), 132, optin) == atomic
    assert choose((2, 1024, 38, 63), torch.float32, (5, 1024, 0, 7), 132, optin) == atomic
    assert choose((2, 1024, 80, 80), torch.float64, (9, 1024, 7, 7), 132, 48 * 1024) == atomic
    monkeypatch.setenv("ROI_OPS_CUPY_BACKWARD", "atomic")
    assert choose(*frcnn) == atomic
    monkeypatch.setenv("ROI_OPS_CUPY_BACKWARD", "planes")
    assert choose((1, 16, 38, 63), torch.float32, (512, 16, 7, 7), 132, optin) == planes
    assert choose((2, 1, 300, 300), torch.float32, (5, 1, 7, 7), 132, optin) == atomic  # no fit


def test_channels_last_gradient_while_it_fits_in_l2(monkeypatch):
    assert kernels.channels_last_gradient(28 * 2**20, 50 * 2**20)
    assert not kernels.channels_last_gradient(445 * 2**20, 50 * 2**20)
    monkeypatch.setenv(kernels.GRADIENT_LAYOUT_ENV, "channels_last")
    assert kernels.channels_last_gradient(2, 1)
    monkeypatch.setenv(kernels.GRADIENT_LAYOUT_ENV, "contiguous")
    assert not kernels.channels_last_gradient(1, 2)


def test_backward_plans_size_blocks_and_shared_memory(monkeypatch):
    grad_output = torch.randn(600, 20, 7, 7)
    argmax = torch.zeros(600, 20, 7, 7, dtype=torch.int32)
    batch_index = torch.zeros(600, dtype=torch.int64)
    grad_input = torch.zeros(3, 20, 30, 40)
    planes = kernels.plan_backward(
        grad_output, argmax, batch_index, grad_input, 132, 0, kernels.BACKWARD_PLANES
    )
    assert planes.name == "roi_pool_backward_planes<float, 256>"
    assert planes.grid == (3 * 20, 1, 1) and planes.block == (256, 1, 1)
    assert planes.shared_mem == 49 * 8 + kernels.PLANES_CHANNELS * 30 * 40 * 4
    assert int(planes.args[12]) == kernels.PLANES_CHANNELS and int(planes.args[17]) == 600
    assert [int(a) for a in planes.args[14:17]] == [20 * 30 * 40, 30 * 40, 1]  # gradient strides
    last = grad_input.contiguous(memory_format=torch.channels_last)
    in_last = kernels.plan_backward(grad_output, argmax, batch_index, last, 132)
    assert [int(a) for a in in_last.args[14:17]] == [20 * 30 * 40, 1, 20]
    with pytest.raises(ValueError, match="grad_input's H stride must be W times its W stride"):
        kernels.plan_backward(grad_output, argmax, batch_index, grad_input[:, :, ::2], 132)
    half = kernels.plan_backward(
        grad_output.half(), argmax, batch_index, grad_input.half(), 132, 0, kernels.BACKWARD_PLANES
    )
    assert half.name == "roi_pool_backward_planes<roi_half, 256>"
    assert half.shared_mem == planes.shared_mem  # float32 accumulators
    # 1024 threads when the block leaves no room for a second one on the SM
    alone = kernels.plan_backward(
        grad_output, argmax, batch_index, grad_input, 132, 0, kernels.BACKWARD_PLANES, 8 * 1024
    )
    assert alone.name == "roi_pool_backward_planes<float, 1024>" and alone.block == (1024, 1, 1)
    assert kernels.planes_threads(218 * 1024, 227 * 1024) == 1024
    assert kernels.planes_threads(55 * 1024, 227 * 1024) == 256
    monkeypatch.setenv("ROI_OPS_CUPY_PLANES_THREADS", "1024")
    assert kernels.planes_threads(1024, 227 * 1024) == 1024
    # The atomic kernel: small channel blocks when grad_input does not fit in L2.
    cached = kernels.plan_backward(grad_output, argmax, batch_index, grad_input, 1, 2**30)
    streamed = kernels.plan_backward(grad_output, argmax, batch_index, grad_input, 1, 2**10)
    assert int(streamed.args[12]) == kernels.BACKWARD_BLOCK_ELEMENTS_STREAMED // 49
    assert int(cached.args[12]) == min(20, kernels.TARGET_BLOCK_ELEMENTS // 49)
    assert cached.grid == (600, 1, 1) and streamed.grid == (600, 2, 1)
    empty = torch.zeros(0, 20, 7, 7, dtype=torch.int32)
    assert kernels.plan_backward(grad_output[:0], empty, batch_index[:0], grad_input, 132) is None
    with pytest.raises(ValueError, match="at least one ROI"):
        kernels.plan_backward(
            grad_output[:0], empty, batch_index[:0], grad_input, 132, 0, kernels.BACKWARD_PLANES
        )


def test_plan_picks_kernels_sizes_blocks_and_caches_edges(monkeypatch):
    x = torch.ones(2, 64, 10, 10)
    rois = torch.zeros(3, 5)
    problem = RoIPoolProblem(x, rois, 7, 7, 0.5, True)
    out = torch.empty(problem.output_shape)
    arg = torch.empty(problem.output_shape, dtype=torch.int32)
    unit = kernels.plan_forward(problem, out, arg, multiprocessors=132)
    assert unit.name == "roi_pool_forward_unit<float, float, true>"  # unit W stride
    assert unit.block == (256, 1, 1) and unit.shared_mem == 0  # 5 groups of 49 bins
    assert unit.grid == (3, math.ceil(64 / int(unit.args[-3])), 1)
    assert int(unit.args[-1]) == arg.data_ptr()
    # Unit channel blocks hold whole steps: 4 channels (2 for float64) in each group of bins.
    assert [
        kernels._whole_unit_steps(41, 196, torch.float32),
        kernels._whole_unit_steps(167, 49, torch.float32),
    ] == [40, 160]
    assert kernels._whole_unit_steps(41, 196, torch.float64) == 40
    assert kernels._whole_unit_steps(7, 49, torch.float64) == 7  # less than one step: kept
    assert kernels._whole_unit_steps(23, 49, torch.float64) == 20
    strided = dataclasses.replace(problem, input=torch.ones(2, 64, 10, 20)[..., ::2])
    plane = kernels.plan_forward(strided, out, arg, multiprocessors=132)
    assert plane.name == "roi_pool_forward_plane<float, float, true>"
    assert plane.block == (256, 1, 1) and plane.shared_mem == 0  # 5 groups of 49 bins
    channels_per_block = int(plane.args[-3])
    assert plane.grid == (3, math.ceil(64 / channels_per_block), 1)
    assert int(plane.args[-1]) == arg.data_ptr()
    last = problem.input.contiguous(memory_format=torch.channels_last)
    aligned = dataclasses.replace(problem, input=last, needs_argmax=False)
    cvec = kernels.plan_forward(aligned, out, None, 1)
    assert cvec.name == "roi_pool_forward_cvec<float, float, false>"
    # 8 threads of 8 channels per bin give 3 x 1 blocks, fewer than 8 per SM: halved twice.
    assert cvec.block == (256, 1, 1) and cvec.grid == (3, 4, 1) and int(cvec.args[-3]) == 16
    assert cvec.shared_mem == 0 and int(cvec.args[-1]) == 0
    assert int(kernels.plan_forward(aligned, out, None, 132).args[-3]) == 8  # one thread
    wide = dataclasses.replace(
        aligned, input=torch.ones(2, 1000, 3, 3).to(memory_format=torch.channels_last)
    )
    assert int(kernels.plan_forward(wide, out, None, 1).args[-3]) == 64  # 8 threads at most
    shifted = torch.empty(2 * 64 * 10 * 10 + 1)[1:].as_strided(last.shape, last.stride())
    without_argmax = dataclasses.replace(problem, input=shifted, needs_argmax=False)
    chan = kernels.plan_forward(without_argmax, out, None, 132)
    assert chan.name == "roi_pool_forward_chan<float, float, false>"
    assert chan.block == (32, 8, 1) and chan.grid == (3, 2, 1) and int(chan.args[-1]) == 0
    assert chan.shared_mem == 8 * 14 and int(chan.args[-3]) == 1
    monkeypatch.setattr(kernels, "MAX_CACHED_EDGES", 13)
    uncached = kernels.plan_forward(without_argmax, out, None, multiprocessors=132)
    assert uncached.shared_mem == 0 and int(uncached.args[-3]) == 0
    assert [kernels.plane_threads(nb) for nb in (1, 49, 100, 196, 256, 257, 4000)] == [
        256,
        256,
        224,
        224,
        256,
        256,
        256,
    ]
    monkeypatch.setenv("ROI_OPS_CUPY_KERNEL", "plane")
    assert kernels.forward_kernel(problem.input) == "roi_pool_forward_plane"
    monkeypatch.setenv("ROI_OPS_CUPY_KERNEL", "chan")
    assert kernels.forward_kernel(problem.input) == "roi_pool_forward_chan"
    monkeypatch.delenv("ROI_OPS_CUPY_KERNEL")
    empty = RoIPoolProblem(x, torch.zeros(0, 5), 7, 7, 0.5, True)
    assert kernels.plan_forward(empty, torch.empty(0, 64, 7, 7), None, 132) is None


def test_cvec_takes_aligned_channels_last_inputs():
    def last(c, dtype=torch.float32):
        return torch.empty(2, c, 5, 6, dtype=dtype).contiguous(memory_format=torch.channels_last)

    assert [kernels.cvec_lanes(d) for d in DTYPES] == [8, 8, 4, 2]
    assert [kernels.cvec_thread_channels(d) for d in DTYPES] == [8, 8, 8, 4]
    assert kernels.forward_kernel(last(20)) == "roi_pool_forward_cvec"
    assert kernels.forward_kernel(last(20, torch.float16)) == "roi_pool_forward_chan"
    assert kernels.forward_kernel(last(20)[:, 1:17]) == "roi_pool_forward_chan"  # 4 bytes in


# ---- Running the kernels: a CPU emulator everywhere, CuPy on a CUDA device -------------------


def _guarded(shape, strides, dtype, device, fill, shift=0):
    """A view with the given strides inside a buffer whose other elements are `fill`, starting
    `shift` elements after the guard (_GUARD elements: 16-byte aligned)."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) if all(shape) else 0
    buffer = torch.full((extent + 2 * _GUARD + shift,), fill, dtype=dtype, device=device)
    return buffer.as_strided(shape, strides, _GUARD + shift), buffer


def _place_input(x: torch.Tensor, layout: str, device) -> torch.Tensor:
    """`x` copied onto `device` in `layout`, every element around it NaN (so a stray read shows)."""
    if layout == "strided":  # every other column of a wider map: contiguous in no format
        n, c, h, w = x.shape
        view, _ = _guarded(
            (n, c, h, 2 * w), (c * h * 2 * w, h * 2 * w, 2 * w, 1), x.dtype, device, math.nan
        )
        view = view[..., 1::2]
    else:
        last = layout.startswith("channels_last")
        fmt = torch.channels_last if last else torch.contiguous_format
        strides = torch.empty(x.shape, device="meta").contiguous(memory_format=fmt).stride()
        shift = 1 if layout == "channels_last_unaligned" else 0
        view, _ = _guarded(tuple(x.shape), strides, x.dtype, device, math.nan, shift)
    view.copy_(x)
    return view


def _contiguous_strides(shape) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _outputs(shape, dtype, device, needs_argmax):
    """Poisoned outputs (NaN, -7) inside guard buffers of -7; returns views and buffers."""
    strides = _contiguous_strides(shape)
    output, out_buf = _guarded(shape, strides, dtype, device, -7.0)
    output.fill_(math.nan)
    argmax, arg_buf = _guarded(shape, strides, torch.int32, device, -7)
    return output, out_buf, (argmax if needs_argmax else None), arg_buf


def _check_guards(buffer: torch.Tensor, fill: float) -> None:
    guard = torch.cat([buffer[:_GUARD], buffer[-_GUARD:]]).cpu()
    assert bool((guard == fill).all()), "a kernel wrote outside its output"


class Emulator:
    """roi_pool.cu compiled as host C++ (tools/host_emulator.cpp), run on CPU tensors."""

    device = torch.device("cpu")

    def __init__(self, library: ctypes.CDLL):
        self._run = library.roi_emulate
        self._run.restype = ctypes.c_int
        self._run.argtypes = [
            ctypes.c_char_p,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_ulonglong,
        ]

    def launch(self, launch: kernels.Launch) -> None:
        words = np.array([np.asarray(a).view(np.uint64) for a in launch.args], dtype=np.uint64)
        pointer = words.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))
        grid_x, grid_y, _ = launch.grid
        status = self._run(
            launch.name.encode(), grid_x, grid_y, *launch.block[:2], pointer, launch.shared_mem
        )
        assert status == 0, f"emulator refused {launch.name}: {status}"


class CudaLauncher:
    """The same launch plans, run by roi_ops_cupy.launch through CuPy."""

    device = torch.device("cuda")

    def __init__(self):
        from roi_ops_cupy import launch

        self._launch = launch

    def launch(self, launch: kernels.Launch) -> None:
        if launch.name.startswith(kernels.BACKWARD_KERNELS):
            names = (launch.name,)
        else:
            types = {v: k for k, v in kernels.C_TYPES.items()}
            t, r = re.match(r"\w+<(\w+), (\w+),", launch.name).groups()
            names = kernels.forward_names(types[t], types[r])
        self._launch._run(torch.cuda.current_device(), launch, names)
        torch.cuda.synchronize()


def _build_emulator(directory: Path) -> ctypes.CDLL | None:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    target = directory / "host_emulator.so"
    subprocess.run(
        [
            compiler,
            "-std=c++20",
            "-O1",
            "-ffp-contract=off",
            "-fPIC",
            "-shared",
            "-pthread",
            "-Wall",
            "-Wno-unknown-pragmas",
            f"-I{SOURCE.parent}",
            str(EMULATOR_SOURCE),
            "-o",
            str(target),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return ctypes.CDLL(str(target))


@pytest.fixture(scope="module")
def emulator_library(tmp_path_factory) -> ctypes.CDLL:
    library = _build_emulator(tmp_path_factory.mktemp("cupy-emulator"))
    if library is None:
        pytest.skip("no C++ compiler for the host emulator")
    return library


@pytest.fixture(scope="module", params=["emulator", "cuda"])
def runner(request, emulator_library):
    reason = CupyBackend().check_available()
    if request.param == "emulator":
        if reason is None:
            pytest.skip("the kernels run on the CUDA device here (the emulator stands in for it)")
        return Emulator(emulator_library)
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    return CudaLauncher()


def run_forward(
    runner,
    x,
    rois,
    size,
    scale,
    *,
    layout="contiguous",
    needs_argmax=True,
    multiprocessors=1,
    grid_y=None,
):
    """The kernels on poisoned outputs; returns CPU (output, argmax or None)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    device = runner.device
    placed = _place_input(x, layout, device)
    rois = rois.to(device)
    problem = RoIPoolProblem(placed, rois, size[0], size[1], scale, needs_argmax)
    output, out_buf, argmax, arg_buf = _outputs(problem.output_shape, x.dtype, device, needs_argmax)
    launch = kernels.plan_forward(problem, output, argmax, multiprocessors)
    if launch is not None:
        if grid_y is not None:  # fewer block rows than channel blocks: the kernels loop
            launch = dataclasses.replace(launch, grid=(launch.grid[0], grid_y, 1))
        runner.launch(launch)
    _check_guards(out_buf, -7.0)
    _check_guards(arg_buf, -7)
    return output.cpu(), (argmax.cpu() if needs_argmax else None)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit equality (so -0.0 differs from +0.0); NaNs must match in place, not in payload."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = _BITS[actual.element_size()]
    nan = expected.isnan()
    mismatch = (actual.isnan() != nan) | (~nan & (actual.view(bits) != expected.view(bits)))
    if mismatch.any():
        where = mismatch.nonzero()[:5].tolist()
        pytest.fail(f"{int(mismatch.sum())} of {mismatch.numel()} elements differ, e.g. {where}")


def check(runner, x, rois, size, scale, **options) -> None:
    expected, expected_argmax = reference_roi_pool(x, rois, size, scale)
    for needs_argmax in (True, False):
        output, argmax = run_forward(
            runner, x, rois, size, scale, needs_argmax=needs_argmax, **options
        )
        assert_same_bits(output, expected)
        if needs_argmax:
            assert torch.equal(argmax, expected_argmax)


def _wide(x: torch.Tensor, channels: int = 24) -> torch.Tensor:
    """`x` with at least `channels` channels (shifted copies), so channels_last takes a
    channel-lane kernel (24: whole vectors of every dtype for the cvec kernel); NaN,
    infinities and ties survive."""
    copies = math.ceil(channels / x.shape[1])
    return torch.cat([x + i for i in range(copies)], dim=1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_contract_cases(runner, dtype, layout):
    for case in contract_cases("cpu", dtype):
        x = _wide(case.input) if layout.startswith("channels_last") else case.input
        check(runner, x, case.rois_tensor(), case.output_size, case.spatial_scale, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS[:3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_float32_rois_with_half_input(runner, dtype, layout):
    for case in contract_cases("cpu", dtype, seed=3, rois_dtype=torch.float32):
        x = _wide(case.input) if layout.startswith("channels_last") else case.input
        check(runner, x, case.rois_tensor(), case.output_size, case.spatial_scale, layout=layout)


@pytest.mark.parametrize("layout", LAYOUTS[:3])
def test_channel_blocks_loop_and_uncached_edges(runner, layout, monkeypatch):
    # 72 channels: the cvec kernel's last block of 32 has 2 of its 8 vectors.
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 72, 9, 13, generator=g)
    rois = torch.tensor([[0, 0.0, 0.0, 12.0, 8.0], [1, 2.5, 1.5, 9.5, 7.0], [1, -3.0, 2.0, 30, 5]])
    check(runner, x, rois, (3, 4), 1.0, layout=layout, multiprocessors=1, grid_y=1)
    check(runner, x, rois, (3, 4), 1.0, layout=layout, multiprocessors=64)
    monkeypatch.setattr(kernels, "MAX_CACHED_EDGES", 0)
    check(runner, x, rois, (3, 4), 1.0, layout=layout, multiprocessors=64)


@pytest.mark.parametrize("layout", LAYOUTS[:3])
@pytest.mark.parametrize("size", [(1, 1), (16, 16), (17, 16), (20, 30), (70, 60)], ids=str)
def test_bins_per_roi_around_one_block(runner, layout, size):
    # nb = 1 (256 groups), 256 (one group, exact), 272 and 600 (threads loop over bins); 70 + 60
    # edges are more than the cvec kernel caches.
    g = torch.Generator().manual_seed(13)
    x = torch.randn(1, 20, 22, 33, generator=g)
    rois = torch.tensor([[0, 1.0, 2.0, 30.0, 20.0], [0, 4.0, 4.0, 6.0, 5.0]])
    check(runner, x, rois, size, 1.0, layout=layout, multiprocessors=1)


@pytest.mark.parametrize("layout", LAYOUTS[:3])
def test_many_bins_are_staged_in_rounds(runner, layout):
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 18, 30, 30, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 2.0, 27.0, 29.0], [0, 5.0, 5.0, 6.0, 6.0]], dtype=torch.float64)
    check(runner, x, rois, (9, 11), 1.0, layout=layout)  # 99 bins: two rounds of 64


@pytest.mark.parametrize("kernel", ["unit", "plane", "cvec", "chan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_kernels_on_ties_and_specials(runner, dtype, kernel, monkeypatch):
    # Ties everywhere, signed zeros, NaN and -inf; channel counts that leave the unit kernel's
    # groups of four channels partly empty; bins narrower than a pixel (with (12, 40) every bin
    # of the first three ROIs has at most 2 x 2 elements: the unit kernel's loop-free path; 200
    # and 196 bins leave 8 and 4 bins to a last warp whose lanes spread over channels);
    # ROIs cut by the border. cvec: 24 float16 channels leave the last of 4 threads per bin
    # empty; 20 float32 (22 float64) channels leave one thread half its channels.
    if kernel == "plane":
        monkeypatch.setenv("ROI_OPS_CUPY_KERNEL", "plane")
    layout = {"cvec": "channels_last", "chan": "channels_last_unaligned"}.get(kernel, "contiguous")
    lane_channels = {torch.float32: 20, torch.float64: 22}.get(dtype, 24)
    x = tie_heavy_features((2, lane_channels if layout != "contiguous" else 11, 12, 40), 21, dtype)
    rows = [
        [0, 3.0, 1.0, 5.0, 10.0],
        [1, 7.0, 0.0, 13.0, 11.0],
        [0, 2.0, 2.0, 35.0, 9.0],
        [1, -20.0, -3.0, 50.0, 30.0],
        [1, 38.0, 6.0, 90.0, 6.0],
    ]
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    rois = torch.tensor(rows, dtype=torch.float64).to(rois_dtype)
    for size in [(7, 7), (5, 40), (3, 2), (12, 1), (12, 40), (14, 14)]:
        check(runner, x, rois, size, 1.0, layout=layout, multiprocessors=1)
    # channel blocks loop
    check(runner, x, rois, (7, 7), 1.0, layout=layout, multiprocessors=64, grid_y=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_float_edges_reach_one_row_further(runner, dtype):
    # value = row index, so each bin's max sits on its last row
    x = torch.arange(64, dtype=torch.float64).reshape(1, 1, 64, 1).expand(1, 2, 64, 3).to(dtype)
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 56.0]], dtype=rois_dtype)  # roi_h = 57
    output, argmax = run_forward(runner, x, rois, (7, 1), 1.0)
    last_row = argmax[0, 0, :, 0] // 3
    if dtype in (torch.float32, torch.bfloat16):  # float32 geometry: bin_h = 8.142857
        assert last_row[-1] == 57  # integer arithmetic would end the last bin at row 56
    assert torch.equal(argmax, reference_roi_pool(x, rois, (7, 1), 1.0)[1])


def test_half_geometry_rounds_every_step(runner):
    # float16 rois round every product and quotient to half; float32 rois with the same
    # float16 input do not. Both must match the reference, including +-65504.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 64, 64, generator=g).to(torch.float16)
    rows = [
        [0, 100.5, 3.3, 201.0, 199.9],
        [0, 0.1, 0.2, 133.0, 1e4],
        [0, 65504, 3, -65504, 4],
        [0, 41.7, 50.5, 43.3, 52.5],
    ]
    for rois_dtype in (torch.float16, torch.float32):
        check(runner, x, torch.tensor(rows, dtype=rois_dtype), (5, 3), 0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_subnormals_and_signed_zeros(runner, dtype):
    # CuPy compiles with -ftz=true, under which float comparisons see subnormals as zero; the
    # kernels compare integer keys instead. -0 and +0 are equal: the first one stays.
    tiny = {
        torch.float16: 2.0**-24,
        torch.bfloat16: 2.0**-133,
        torch.float32: 2.0**-149,
        torch.float64: 2.0**-1074,
    }[dtype]
    pattern = torch.tensor(
        [
            [-0.0, 0.0, tiny, 3 * tiny],
            [-tiny, 2 * tiny, 0.0, -0.0],
            [-2 * tiny, -tiny, -0.0, -3 * tiny],
            [0.0, -0.0, -tiny, tiny],
        ],
        dtype=torch.float64,
    )
    x = torch.stack([pattern, pattern.flip(1), -pattern]).unsqueeze(0).to(dtype)
    assert bool((x != 0).any())
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    rois = torch.tensor(
        [[0, 0, 0, 3, 3], [0, 0, 0, 1, 1], [0, 2, 0, 3, 3], [0, 0, 2, 3, 3]], dtype=rois_dtype
    )
    for size in ((2, 2), (1, 1), (4, 4)):
        check(runner, x, rois, size, 1.0)


_NAN_PAYLOADS = {  # quiet, negative, signalling and odd-payload NaNs of each dtype
    torch.float16: [0x7E00, 0xFE00, 0x7C01, 0x7D55],
    torch.bfloat16: [0x7FC0, 0xFFC0, 0x7F81, 0x7FA5],
    torch.float32: [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FAAAAAA],
    torch.float64: [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF5555555555555],
}


def _signed(value: int, nbits: int) -> int:
    return value - (1 << nbits) if value >= 1 << (nbits - 1) else value


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_any_nan_is_maximal_and_copied_bit_for_bit(runner, dtype):
    g = torch.Generator().manual_seed(9)
    bits = _BITS[torch.empty((), dtype=dtype).element_size()]
    x = (torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64) * 5).to(dtype)
    raw = x.view(bits)
    places = [(0, 1, 2), (0, 4, 4), (1, 0, 5), (1, 3, 3), (2, 2, 1), (3, 5, 0), (3, 1, 1)]
    for i, (c, h, w) in enumerate(places):
        raw[0, c, h, w] = _signed(_NAN_PAYLOADS[dtype][i % 4], 8 * x.element_size())
    assert int(x.isnan().sum()) == len(places)
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    rois = torch.tensor([[0, 0, 0, 5, 5], [0, 1, 1, 5, 5], [0, 0, 2, 3, 5]], dtype=rois_dtype)
    check(runner, x, rois, (2, 3), 1.0)
    output, argmax = run_forward(runner, x, rois, (2, 3), 1.0)
    planes = x.view(bits).reshape(1, 4, 36).expand(3, 4, 36)
    picked = planes.gather(2, argmax.clamp(min=0).long().reshape(3, 4, 6)).reshape(argmax.shape)
    assert torch.equal(output.view(bits)[argmax >= 0], picked[argmax >= 0])
    # Inference (no argmax) takes another reduction (max.NaN in the unit kernel): same bits.
    inference, _ = run_forward(runner, x, rois, (2, 3), 1.0, needs_argmax=False)
    assert torch.equal(inference.view(bits), output.view(bits))


def test_emulated_half_conversions_are_round_to_nearest_even(emulator_library):
    to_half = emulator_library.roi_float_to_half
    to_half.restype, to_half.argtypes = ctypes.c_ushort, [ctypes.c_float]
    back = emulator_library.roi_half_to_float
    back.restype, back.argtypes = ctypes.c_float, [ctypes.c_ushort]
    g = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(2000, generator=g) * 10.0 ** torch.randint(-9, 6, (2000,), generator=g),
            torch.tensor(
                [
                    65504.0,
                    65519.9,
                    65520.0,
                    1e6,
                    2.0**-24,
                    2.0**-25,
                    3 * 2.0**-26,
                    0.0,
                    -0.0,
                    math.inf,
                    -math.inf,
                    2049.0,
                    2051.0,
                    1.00048828125,
                ]
            ),
        ]
    ).float()
    expected = values.to(torch.float16).view(torch.int16).numpy().astype(np.uint16)
    got = np.array([to_half(float(v)) for v in values], dtype=np.uint16)
    assert np.array_equal(got, expected)
    halves = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = ~halves.isnan()
    decoded = torch.tensor([back(int(h)) for h in range(2**16)], dtype=torch.float32)
    assert torch.equal(decoded[finite], halves.float()[finite])
    assert bool(decoded[~finite].isnan().all())


GRADIENT_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _gradient_strides(shape, layout: str) -> tuple[int, ...]:
    return torch.empty(shape, device="meta", memory_format=GRADIENT_LAYOUTS[layout]).stride()


def _run_backward_planes(
    runner, grad_output, argmax, batch, shape, dtype, layout="contiguous"
) -> torch.Tensor:
    """grad_input (in `layout`) from the planes kernel, poisoned first (every element must be
    written), inside a guard buffer."""
    strides = _gradient_strides(shape, layout)
    grad_input, buffer = _guarded(shape, strides, dtype, runner.device, -7.0)
    grad_input.fill_(math.nan)
    launch = kernels.plan_backward(
        grad_output, argmax, batch, grad_input, 1, 0, kernels.BACKWARD_PLANES
    )
    runner.launch(launch)
    _check_guards(buffer, -7.0)
    return grad_input


def _run_backward_atomic(runner, grad_output, argmax, batch, shape, layout, multiprocessors=1):
    """The atomic kernel's launch plan and its zero-filled grad_input (accumulator dtype, in
    `layout`, inside a guard buffer); run it with `_finish_backward_atomic`."""
    accumulate = kernels.accumulate_dtype(grad_output.dtype)
    strides = _gradient_strides(shape, layout)
    grad_input, buffer = _guarded(shape, strides, accumulate, runner.device, -7.0)
    grad_input.zero_()
    launch = kernels.plan_backward(grad_output, argmax, batch, grad_input, multiprocessors)
    return launch, grad_input, buffer


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", list(GRADIENT_LAYOUTS))
def test_backward_scatter(runner, dtype, layout, monkeypatch):
    """Both backward kernels into a gradient in `layout`, with real and zero-stride grad_output,
    one or many channel blocks."""
    case = contract_cases("cpu", dtype, seed=2)[0]
    x, rois = _wide(case.input, 5), case.rois_tensor()
    _, argmax = reference_roi_pool(x, rois, case.output_size, case.spatial_scale)
    g = torch.Generator().manual_seed(4)
    grad = torch.randint(1, 5, argmax.shape, generator=g).to(dtype)
    batch = rois[:, 0].double().trunc().clamp(0, x.shape[0] - 1).long()
    expected = reference_roi_pool_backward(grad, argmax, rois, tuple(x.shape))
    device = runner.device
    zero_strides = grad[:, :, :1, :1].to(device).expand(grad.shape)
    # (SM count, grid rows): one channel block; then one channel per block, with the channel
    # blocks looped over by a single grid row.
    for grad_output, (multiprocessors, grid_y) in [
        (grad.to(device), (1, None)),
        (grad.to(device), (64, 1)),
        (zero_strides, (1, None)),
        (zero_strides, (64, 1)),
    ]:
        reference = expected
        if grad_output.stride(3) == 0:  # every bin carries grad[k, c, 0, 0]
            reference = reference_roi_pool_backward(grad_output.cpu(), argmax, rois, tuple(x.shape))
        launch, grad_input, buffer = _run_backward_atomic(
            runner, grad_output, argmax.to(device), batch.to(device), x.shape, layout,
            multiprocessors,
        )  # fmt: skip
        if grid_y is not None:
            assert launch.grid[1] > 1
            launch = dataclasses.replace(launch, grid=(launch.grid[0], grid_y, 1))
        runner.launch(launch)
        _check_guards(buffer, -7.0)
        assert torch.equal(grad_input.cpu().to(torch.float64), reference)
        # The planes kernel: one channel per block, then blocks of 2 (the last one short); blocks
        # of 256 and of 1024 threads.
        for channels, threads in itertools.product((1, 2), kernels.PLANES_THREADS):
            monkeypatch.setattr(kernels, "PLANES_CHANNELS", channels)
            monkeypatch.setenv("ROI_OPS_CUPY_PLANES_THREADS", str(threads))
            planes = _run_backward_planes(
                runner, grad_output, argmax.to(device), batch.to(device), x.shape, dtype, layout
            )
            assert torch.equal(planes.cpu(), reference.to(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "kernel, threads",
    [(kernels.BACKWARD_ATOMIC, None)]
    + [(kernels.BACKWARD_PLANES, t) for t in kernels.PLANES_THREADS],
)
@pytest.mark.parametrize("layout", list(GRADIENT_LAYOUTS))
def test_backward_many_rois_in_rounds(runner, dtype, kernel, threads, layout, monkeypatch):
    """2600 ROIs (the planes kernel collects an image's ROIs 1024 at a time, the last round
    short), images interleaved, some ROIs invalid, into a gradient in `layout`; float16/bfloat16
    sums pass their precision and are rounded once."""
    if threads is not None:
        monkeypatch.setenv("ROI_OPS_CUPY_PLANES_THREADS", str(threads))
    g = torch.Generator().manual_seed(7)
    num_images, channels, height, width = 3, 2, 9, 11
    x = torch.randn(num_images, channels, height, width, generator=g).to(dtype)
    k = 2600
    corners = torch.rand(k, 2, generator=g) * torch.tensor([width - 1.0, height - 1.0])
    sizes = torch.rand(k, 2, generator=g) * 5
    batch_values = torch.randint(0, num_images, (k,), generator=g).double()
    batch_values[::37] = num_images  # out of range: every bin empty, no gradient
    rois = torch.cat([batch_values[:, None], corners, corners + sizes], dim=1).to(
        torch.float32 if dtype == torch.bfloat16 else dtype
    )
    _, argmax = reference_roi_pool(x, rois, (3, 2), 1.0)
    grad = (torch.randn(argmax.shape, generator=g) * 3).to(dtype)
    batch = rois[:, 0].double().trunc().clamp(0, num_images - 1).long()
    expected = reference_roi_pool_backward(grad, argmax, rois, tuple(x.shape))
    device = runner.device
    args = (grad.to(device), argmax.to(device), batch.to(device))
    if kernel == kernels.BACKWARD_PLANES:
        result = _run_backward_planes(runner, *args, tuple(x.shape), dtype, layout).cpu()
    else:
        launch, grad_input, buffer = _run_backward_atomic(runner, *args, x.shape, layout)
        runner.launch(launch)
        _check_guards(buffer, -7.0)
        result = grad_input.cpu().to(dtype)
    # Atomic sums come in any order: within the summation bound of the exact float64 sum.
    accumulate = kernels.accumulate_dtype(dtype)
    bound = backward_error_bound(grad, argmax, rois, tuple(x.shape), accumulate, dtype)
    error = (result.double() - expected).abs()
    assert bool(error.le(bound).all()), f"worst excess {(error - bound).max().item()}"
    assert bool(expected.ne(0).sum() > 100)  # real sums, not zeros


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hypothesis_differential(runner, layout):
    @settings(
        max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(roi_pool_cases(max_rois=6), st.booleans())
    def run(case, needs_argmax):
        x = _wide(case.input) if layout.startswith("channels_last") else case.input
        rois = case.rois_tensor()
        expected, expected_argmax = reference_roi_pool(
            x, rois, case.output_size, case.spatial_scale
        )
        output, argmax = run_forward(
            runner,
            x,
            rois,
            case.output_size,
            case.spatial_scale,
            layout=layout,
            needs_argmax=needs_argmax,
        )
        assert_same_bits(output, expected)
        if needs_argmax:
            assert torch.equal(argmax, expected_argmax)

    run()


# ---- On a CUDA device only: the backend API, streams, torchvision, the conformance kit -------

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_backend() -> CupyBackend:
    backend = CupyBackend()
    reason = backend.check_available()
    if reason is not None:
        pytest.skip(f"cupy backend unavailable: {reason}")
    return backend


def _backend_forward(backend, x, rois, size, scale, needs_argmax=True):
    problem = RoIPoolProblem(x, rois, size[0], size[1], scale, needs_argmax)
    output = torch.full(problem.output_shape, math.nan, dtype=x.dtype, device=x.device)
    argmax = None
    if needs_argmax:
        argmax = torch.full(problem.output_shape, -7, dtype=torch.int32, device=x.device)
    backend.forward(problem, output, argmax)
    return output, argmax


def _detection_rois(num_images, count, height, width, scale, g, dtype=torch.float32):
    boxes = torch.rand(count, 4, generator=g, dtype=torch.float64)
    boxes[:, 0::2] *= width / scale
    boxes[:, 1::2] *= height / scale
    low = torch.minimum(boxes[:, :2], boxes[:, 2:])
    high = torch.maximum(boxes[:, :2], boxes[:, 2:])
    batch = torch.randint(0, num_images, (count, 1), generator=g).double()
    return torch.cat([batch, low, high], dim=1).to(dtype)


@needs_cuda
def test_backend_forward_on_a_side_stream(cuda_backend):
    g = torch.Generator().manual_seed(21)
    x = torch.randn(2, 32, 20, 24, generator=g)
    rois = _detection_rois(2, 40, 20, 24, 0.5, g)
    expected, expected_argmax = reference_roi_pool(x, rois, (7, 7), 0.5)
    source, rois_gpu = x.cuda(), rois.cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        features = torch.full(x.shape, math.nan, device="cuda")
        torch.cuda._sleep(50_000_000)  # the features are written late on this stream ...
        features.copy_(source)
        # ... so a kernel launched on any other stream would pool NaN.
        output, argmax = _backend_forward(cuda_backend, features, rois_gpu, (7, 7), 0.5)
    torch.cuda.synchronize()
    assert_same_bits(output.cpu(), expected)
    assert torch.equal(argmax.cpu(), expected_argmax)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("kernel", ["planes", "atomic"])
@pytest.mark.parametrize("layout", ["auto", "channels_last", "contiguous"])
def test_backend_backward_with_planes_that_fill_shared_memory(
    cuda_backend, dtype, kernel, layout, monkeypatch
):
    """A 160 x 200 gradient plane (125 KB of float32 sums): the planes kernel runs one
    1024-thread block per SM with the shared-memory opt-in; against the scalar reference. The
    gradient of a channels_last input comes back channels_last (it fits in L2: "auto"), or in
    the layout forced by ROI_OPS_CUPY_GRADIENT_LAYOUT."""
    from roi_ops_cupy import launch

    g = torch.Generator().manual_seed(23)
    shape = (2, 3, 160, 200)
    x = torch.randn(shape, generator=g).to(dtype)
    rois = _detection_rois(2, 300, 160, 200, 0.5, g)
    rois = rois.to(dtype) if dtype == torch.float16 else rois
    _, argmax = reference_roi_pool(x, rois, (7, 7), 0.5)
    grad = torch.randint(-3, 4, argmax.shape, generator=g).to(dtype)  # exact sums
    batch = rois[:, 0].double().trunc().clamp(0, shape[0] - 1).long()
    expected = reference_roi_pool_backward(grad, argmax, rois, shape).to(dtype)
    _, _, shared_limit = launch._device_sizes(torch.cuda.current_device())
    plane_bytes = 160 * 200 * 4
    if plane_bytes + kernels.PLANES_STATIC_SHARED + 8 * 49 > shared_limit:
        pytest.skip(f"this device gives a block {shared_limit} B of shared memory")
    assert kernels.planes_threads(plane_bytes + 8 * 49, shared_limit) == 1024
    monkeypatch.setenv("ROI_OPS_CUPY_BACKWARD", kernel)  # 6 planes: too few to choose planes
    if layout != "auto":
        monkeypatch.setenv(kernels.GRADIENT_LAYOUT_ENV, layout)
    result = cuda_backend.backward(
        grad.cuda(), argmax.cuda(), batch.cuda(), shape, dtype, torch.channels_last
    )
    channels_last = layout != "contiguous"
    assert result.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(result.cpu(), expected)
    result = cuda_backend.backward(grad.cuda(), argmax.cuda(), batch.cuda(), shape, dtype)
    assert result.is_contiguous() and torch.equal(result.cpu(), expected)
    assert bool(expected.ne(0).sum() > 1000)  # real sums, not zeros


@needs_cuda
def test_planes_backward_opts_in_below_the_default_shared_memory(cuda_backend, monkeypatch):
    """A 100 x 112 float32 plane: 45 KB of dynamic shared memory, under the 48 KiB a block gets
    without opting in, but over it with the kernel's 4 KB of static arrays. The launch opts in
    for any dynamic size (it failed with CUDA_ERROR_INVALID_VALUE when it opted in only above
    48 KiB)."""
    g = torch.Generator().manual_seed(24)
    shape = (2, 3, 100, 112)
    dynamic = 100 * 112 * 4 + 8 * 49
    assert dynamic <= kernels.DEFAULT_SHARED_LIMIT < dynamic + kernels.PLANES_STATIC_SHARED
    x = torch.randn(shape, generator=g)
    rois = _detection_rois(2, 200, 100, 112, 0.5, g)
    _, argmax = reference_roi_pool(x, rois, (7, 7), 0.5)
    grad = torch.randint(-3, 4, argmax.shape, generator=g).float()  # exact sums
    batch = rois[:, 0].double().trunc().clamp(0, shape[0] - 1).long()
    expected = reference_roi_pool_backward(grad, argmax, rois, shape)
    monkeypatch.setenv("ROI_OPS_CUPY_BACKWARD", "planes")
    result = cuda_backend.backward(grad.cuda(), argmax.cuda(), batch.cuda(), shape, torch.float32)
    assert torch.equal(result.cpu(), expected)
    assert bool(expected.ne(0).sum() > 1000)  # real sums, not zeros


@needs_cuda
def test_backend_backward_is_none_in_deterministic_mode(cuda_backend):
    argmax = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device="cuda")
    grad = torch.ones(1, 1, 1, 1, device="cuda")
    batch = torch.zeros(1, dtype=torch.int64, device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert cuda_backend.backward(grad, argmax, batch, (1, 1, 2, 2), torch.float32) is None
    finally:
        torch.use_deterministic_algorithms(previous)
    result = cuda_backend.backward(grad * 3, argmax, batch, (1, 1, 2, 2), torch.float32)
    assert result.tolist() == [[[[3.0, 0.0], [0.0, 0.0]]]]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_torchvision_on_finite_inputs(cuda_backend, dtype, layout):
    torchvision = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(31)
    for n, c, h, w, k, size, scale in [
        (2, 64, 38, 63, 64, (7, 7), 1 / 16),
        (2, 32, 50, 68, 200, (14, 14), 1 / 16),
        (1, 16, 25, 30, 50, (3, 5), 0.5),
    ]:
        x = torch.randn(n, c, h, w, generator=g, dtype=dtype).cuda()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        rois = _detection_rois(n, k, h, w, scale, g, dtype).cuda()
        output, argmax = _backend_forward(cuda_backend, x, rois, size, scale)
        expected = torchvision.ops.roi_pool(x, rois, size, scale)
        assert torch.equal(output, expected)


@needs_cuda
@pytest.mark.slow
def test_offsets_past_2_31_elements(cuda_backend):
    # Three 2^15 x 2^15 float16 planes (6 GiB): image 2 starts at element 2^31.
    side = 2**15
    x = torch.full((3, 1, side, side), -1.0, dtype=torch.float16, device="cuda")
    g = torch.Generator().manual_seed(41)
    patch = torch.randn(1, 1, 14, 14, generator=g).to(torch.float16)
    x[2, :, side - 14 :, side - 14 :] = patch.cuda()
    lo = float(side - 14)
    rois = torch.tensor([[2, lo, lo, side - 1.0, side - 1.0]], device="cuda")
    output, argmax = _backend_forward(cuda_backend, x, rois, (7, 7), 1.0)
    expected, expected_argmax = reference_roi_pool(
        patch, torch.tensor([[0, 0.0, 0.0, 13.0, 13.0]]), (7, 7), 1.0
    )
    assert_same_bits(output.cpu(), expected)
    rows, cols = expected_argmax // 14, expected_argmax % 14
    assert torch.equal(argmax.cpu(), ((rows + side - 14) * side + cols + side - 14).int())


@needs_cuda
def test_roi_pool_through_roi_ops(cuda_backend):
    import roi_ops

    g = torch.Generator().manual_seed(51)
    x = torch.randn(2, 24, 17, 19, generator=g, dtype=torch.float64).cuda().requires_grad_(True)
    rois = _detection_rois(2, 30, 17, 19, 0.5, g, torch.float64).cuda()
    pooled = roi_ops.roi_pool(x, rois, 4, 0.5, backend="cupy")
    expected, argmax = reference_roi_pool(x.detach().cpu(), rois.cpu(), 4, 0.5)
    assert_same_bits(pooled.detach().cpu(), expected)
    grad = torch.randint(1, 4, pooled.shape, generator=g).double()
    pooled.backward(grad.cuda())
    expected_grad = reference_roi_pool_backward(grad, argmax, rois.cpu(), tuple(x.shape))
    assert torch.equal(x.grad.cpu(), expected_grad)
