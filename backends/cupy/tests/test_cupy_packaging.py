"""The CuPy backend without a GPU: its packaging and declaration, its availability report, and
its kernel source (self-contained, split by family, compiled by nvcc and by NVRTC)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

cupy_backend = pytest.importorskip("roi_ops_cupy.backend")

from roi_ops.backend import (  # noqa: E402
    ALL_FLOAT_DTYPES,
    MultiScaleRoIPoolProblem,
    RoIPoolProblem,
)

from roi_ops_cupy import kernels, planning  # noqa: E402
from roi_ops_cupy.tuning import CupyTuning  # noqa: E402

CupyBackend = cupy_backend.CupyBackend
PLUGIN_DIR = Path(__file__).resolve().parents[1]
CUDA_DIR = PLUGIN_DIR / "roi_ops_cupy" / "cuda"
CHECK_COMPILE = PLUGIN_DIR / "tools" / "check_compile.sh"
PACKAGE_DIR = PLUGIN_DIR / "roi_ops_cupy"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return result.stdout.strip()


# ---- Packaging and declaration ---------------------------------------------------------------


def test_entry_point_declared_in_installed_metadata():
    try:
        dist = metadata.distribution("roi-ops-cupy")
    except metadata.PackageNotFoundError:
        pytest.skip("roi-ops-cupy is not installed (pip install -e backends/cupy)")
    points = [ep for ep in dist.entry_points if ep.group == "roi_ops.backends"]
    assert [(ep.name, ep.value) for ep in points] == [("cupy", "roi_ops_cupy.backend:CupyBackend")]
    assert points[0].load().__name__ == "CupyBackend"
    requires = " ".join(dist.requires or [])
    assert "roi-ops" in requires and "cupy-cuda" in requires


def test_backend_declaration():
    backend = CupyBackend()
    assert backend.name == "cupy"
    assert backend.priority == 110
    assert backend.device_types == frozenset({"cuda"})
    assert backend.dtypes == ALL_FLOAT_DTYPES
    assert backend.deterministic is True
    assert backend.deterministic_backward is False  # atomic sums
    assert backend.reports_bad_rois is True
    assert backend.gradient_formats == frozenset({torch.contiguous_format, torch.channels_last})


def test_source_files_are_package_data():
    text = (PLUGIN_DIR / "pyproject.toml").read_text()
    assert 'roi_ops_cupy = ["cuda/*.cu", "cuda/*.cuh"]' in text
    assert sorted(p.name for p in CUDA_DIR.iterdir()) == sorted(kernels.SOURCE_FILES)
    assert kernels.source().startswith("// RoI max pooling")


# ---- Availability ----------------------------------------------------------------------------


def test_registry_reports_cupy_with_its_availability():
    import roi_ops

    infos = {info.name: info for info in roi_ops.list_backends()}
    assert "cupy" in infos
    reason = CupyBackend().check_available()
    assert infos["cupy"].available == (reason is None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_check_available_reports_missing_cuda():
    reason = CupyBackend().check_available()
    assert isinstance(reason, str) and "no CUDA device" in reason


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
        "from roi_ops.backend import MultiScaleRoIPoolProblem, RoIPoolProblem\n"
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


def test_no_environment_reads_in_the_package():
    """Tuning is a `CupyTuning` value; nothing in the shipped code reads the environment."""
    for path in PACKAGE_DIR.glob("*.py"):
        text = path.read_text()
        assert "os.environ" not in text and "getenv" not in text, path.name


# ---- The kernel source -----------------------------------------------------------------------


def test_forward_pairs_are_the_contracts():
    allowed = {(d, d) for d in DTYPES} | {(torch.float16, torch.float32)}
    allowed |= {(torch.bfloat16, torch.float32)}
    assert set(kernels.FORWARD_PAIRS) == allowed


def test_kernel_names_and_modules():
    for t, r in kernels.FORWARD_PAIRS:
        for expr in kernels.forward_names(t, r):
            assert re.fullmatch(
                r"roi_pool_forward_(plane|chan|unit|cvec|cvec_wide|small|small_cvec)"
                r"<\w+, \w+, (true|false)>",
                expr,
            )
            assert kernels.module_names(expr) == kernels.forward_names(t, r)
    assert kernels.backward_names(torch.bfloat16) == (
        "roi_pool_backward_atomic<roi_bf16, roi_bf16>",
        "roi_pool_backward_planes<roi_bf16, roi_bf16, 256>",
        "roi_pool_backward_planes<roi_bf16, roi_bf16, 1024>",
        "roi_pool_backward_atomic<roi_bf16, float>",
        "roi_pool_backward_planes<roi_bf16, float, 256>",
        "roi_pool_backward_planes<roi_bf16, float, 1024>",
        "roi_pool_backward_planes_grouped<roi_bf16, 256>",  # reads no rois
        "roi_pool_backward_planes_grouped<roi_bf16, 1024>",
    )
    name = kernels.backward_name(kernels.BACKWARD_PLANES, torch.float16, torch.float32, 1024)
    assert kernels.module_names(name) == kernels.backward_names(torch.float16)
    # The fused multi-level kernels: modules of their own.
    for t, r in kernels.FORWARD_PAIRS:
        levels = kernels.forward_levels_names(t, r)
        assert len(levels) == 14 and not set(levels) & set(kernels.forward_names(t, r))
        for expr in levels:
            assert re.fullmatch(
                r"roi_pool_forward_(plane|chan|unit|cvec|cvec_wide|small|small_cvec)_levels"
                r"<\w+, \w+, (true|false)>",
                expr,
            )
            assert kernels.module_names(expr) == levels
    assert kernels.backward_levels_names(torch.float16) == (
        "roi_pool_backward_atomic_levels<roi_half, roi_half>",
        "roi_pool_backward_planes_levels<roi_half, roi_half, 256>",
        "roi_pool_backward_planes_levels<roi_half, roi_half, 1024>",
        "roi_pool_backward_atomic_levels<roi_half, float>",
        "roi_pool_backward_planes_levels<roi_half, float, 256>",
        "roi_pool_backward_planes_levels<roi_half, float, 1024>",
    )
    name = kernels.backward_name(kernels.BACKWARD_ATOMIC_LEVELS, torch.float64, torch.float64)
    assert kernels.module_names(name) == kernels.backward_levels_names(torch.float64)
    # The staged forward's copy: one module, one instantiation a dtype.
    assert kernels.copy_names() == tuple(
        f"roi_ops_copy_channels_last<{t}>" for t in ("roi_half", "roi_bf16", "float", "double")
    )
    assert kernels.module_names(kernels.copy_name(torch.float32)) == kernels.copy_names()
    name = kernels.backward_name(kernels.BACKWARD_PLANES_GROUPED, torch.float16, torch.float32)
    assert name == "roi_pool_backward_planes_grouped<roi_half, 256>"
    assert kernels.module_names(name) == kernels.backward_names(torch.float16)
    # The grouping before the grouped planes backward and the planes backward over levels: one
    # module, one a rois dtype.
    assert kernels.group_rois_names() == tuple(
        f"roi_ops_group_rois<{t}>" for t in ("roi_half", "roi_bf16", "float", "double")
    )
    name = kernels.group_rois_name(torch.float16)
    assert kernels.module_names(name) == kernels.group_rois_names()
    # The tables of maxima: one module, a count a rois dtype and a build a table dtype.
    assert kernels.table_names() == (
        *(f"roi_ops_table_savings<{t}>" for t in ("roi_half", "roi_bf16", "float", "double")),
        *(f"roi_ops_max_tables<{t}>" for t in ("float", "roi_half", "roi_bf16")),
    )
    for name in (
        kernels.max_tables_name(torch.float16),
        kernels.table_savings_name(torch.float64),
    ):
        assert kernels.module_names(name) == kernels.table_names()
    assert (
        len(set(kernels.all_names()))
        == len(kernels.all_names())
        == 7 * 24 + 6 * 6 + 4 * 2 + 4 + 4 + 7
    )


def test_source_is_self_contained_and_split_by_family():
    for name in kernels.SOURCE_FILES:
        text = (CUDA_DIR / name).read_text()
        assert not re.search(r"^\s*#\s*include", text, re.MULTILINE), name
        if name != "common.cuh":  # the host emulator's hooks live in the header only
            assert "HOST_EMULATION" not in text, name
            assert "asm" not in text, name  # PTX goes through the header's primitives
        assert len(text.splitlines()) < 700, name
    header = (CUDA_DIR / "common.cuh").read_text()
    hooks = re.findall(r"^\s*#\s*if.*ROI_OPS_HOST_EMULATION", header, re.MULTILINE)
    assert hooks == ["#ifndef ROI_OPS_HOST_EMULATION"]  # one block of PTX primitives
    for kernel in (*kernels.FORWARD_KERNELS, *kernels.BACKWARD_KERNELS):
        if kernel == kernels.BACKWARD_PLANES_GROUPED:  # the planes family's, single-level only
            assert f"{kernel}(" in (CUDA_DIR / "backward_planes.cu").read_text()
            continue
        family = kernel.removeprefix("roi_pool_") + ".cu"
        if kernel == kernels.FORWARD_CVEC_WIDE:  # the cvec family's, four vectors a thread
            family = "forward_cvec.cu"
        assert f"{kernel}(" in (CUDA_DIR / family).read_text(), family
        assert f"{kernel}_levels(" in (CUDA_DIR / family).read_text(), family


def _expanded_source() -> str:
    """The kernel source with the parameter-group macros (``#define ROI_OPS_..._PARAMETERS``,
    ``..._OUTPUTS``) written out where kernels use them."""
    text = kernels.source()
    pattern = re.compile(r"^#define (ROI_OPS_\w+_(?:PARAMETERS|OUTPUTS))((?:.*\\\n)*.*)$", re.M)
    groups = {m.group(1): m.group(2).replace("\\\n", " ") for m in pattern.finditer(text)}
    text = pattern.sub("", text)
    for name, body in groups.items():
        text = text.replace(name, body)
    return text


def _parameters(kernel: str) -> list[str]:
    """The parameter names of `kernel` in the source."""
    text = _expanded_source()
    start = text.index(f"    {kernel}(")
    signature = text[start : text.index(")", text.index("{", start) - 2) + 1]
    signature = signature[signature.index("(") + 1 : signature.rindex(")")]
    return [re.findall(r"\w+", p)[-1] for p in signature.split(",")]


def test_launch_arguments_are_named_as_the_kernel_parameters():
    x = torch.ones(2, 24, 9, 11)
    rois = torch.tensor([[0, 1.0, 1.0, 8.0, 7.0]] * 3)
    sizes = planning.CudaSizes(132, 50 * 2**20, 227 * 1024)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    layouts = {
        kernels.FORWARD_UNIT: x,
        kernels.FORWARD_SMALL: x,
        kernels.FORWARD_PLANE: x,
        kernels.FORWARD_CVEC: channels_last,
        kernels.FORWARD_CVEC_WIDE: channels_last,
        kernels.FORWARD_SMALL_CVEC: channels_last,
        kernels.FORWARD_CHAN: torch.empty(2 * 24 * 99 + 1)[1:].as_strided(
            x.shape, channels_last.stride()
        ),
    }
    assert set(layouts) == set(kernels.FORWARD_KERNELS)
    for kernel, placed in layouts.items():
        problem = RoIPoolProblem(placed, rois, 3, 3, 0.5, True)
        out = torch.empty(problem.output_shape)
        tuning = CupyTuning(forward_kernel=kernel)
        launch = planning.plan_forward(problem, out, out.int(), sizes, tuning)
        assert launch.name.startswith(kernel + "<"), (kernel, launch.name)
        assert [n for n, _ in launch.args] == _parameters(kernel)
    grad = torch.ones(3, 24, 3, 3)
    groups = torch.empty(planning.group_rois_size(3, 1, 2), dtype=torch.int32)
    for kernel in kernels.BACKWARD_KERNELS:
        grad_input = torch.zeros(2, 24, 9, 11)
        launch = planning.plan_backward(
            grad, grad.int(), rois, grad_input, kernel, sizes, groups=groups
        )
        assert [n for n, _ in launch.args] == _parameters(kernel)
    # The multi-level kernels: the table of levels (one struct parameter of named words), then
    # one word per parameter.
    levels = torch.zeros(3, dtype=torch.int64)
    for kernel, placed in layouts.items():
        features = [placed, placed[:, :, :5, :6]]
        problem = MultiScaleRoIPoolProblem(features, rois, levels, 3, 3, (0.5, 0.25), True)
        out = torch.empty(problem.output_shape)
        tuning = CupyTuning(forward_kernel=kernel)
        launch = planning.plan_forward_levels(problem, out, out.int(), sizes, tuning)
        assert launch.name.startswith(kernel + "_levels<"), (kernel, launch.name)
        table = kernels.MAX_LEVELS * len(planning.LEVEL_MAP_FIELDS)
        parameters = _parameters(kernels.levels_kernel(kernel))
        assert parameters[0] == "maps" and launch.param_words[0] == table
        assert [n for n, _ in launch.args[table:]] == parameters[1:]
        assert len(launch.param_words) == len(parameters)
        assert [n for n, _ in launch.args[:16]] == [
            f"{field}{level}" for level in (0, 1) for field in planning.LEVEL_MAP_FIELDS
        ]
    grads = [torch.zeros(2, 24, 9, 11), torch.zeros(2, 24, 5, 6)]
    launch = planning.plan_backward_levels(grad, grad.int(), rois, levels, grads, sizes)
    table = kernels.MAX_LEVELS * len(planning.LEVEL_GRAD_FIELDS)
    parameters = _parameters(kernels.BACKWARD_ATOMIC_LEVELS)
    assert parameters[0] == "grads" and launch.param_words == (table,) + (1,) * 16
    assert [n for n, _ in launch.args[table:]] == parameters[1:]
    planes = kernels.BACKWARD_PLANES_LEVELS
    grads = [g.to(torch.float32) for g in grads]
    groups = torch.empty(planning.group_rois_size(3, 2, 2), dtype=torch.int32)
    launch = planning.plan_backward_levels(
        grad, grad.int(), rois, levels, grads, sizes, kernel=planes, groups=groups
    )
    table = kernels.MAX_LEVELS * len(planning.LEVEL_PLANE_FIELDS)
    parameters = _parameters(planes)
    assert launch.name.startswith(planes + "<")
    assert parameters[0] == "planes" and launch.param_words == (table,) + (1,) * 13
    assert [n for n, _ in launch.args[table:]] == parameters[1:]
    assert [n for n, _ in launch.args[:7]] == [f"{f}0" for f in planning.LEVEL_PLANE_FIELDS]
    with pytest.raises(ValueError, match="groups"):
        planning.plan_backward_levels(grad, grad.int(), rois, levels, grads, sizes, kernel=planes)
    launch = planning.plan_group_rois(rois, levels, 2, 2, groups)
    assert launch.name == "roi_ops_group_rois<float>"
    assert [n for n, _ in launch.args] == _parameters(kernels.GROUP_ROIS)
    assert launch.block == (kernels.GROUP_THREADS, 1, 1) and launch.grid == (1, 1, 1)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_compile_check_script_passes():
    environment = {**os.environ, "PYTHON": sys.executable}  # the Python that runs the tests
    result = subprocess.run(
        ["bash", str(CHECK_COMPILE)], capture_output=True, text=True, timeout=1200, env=environment
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_compile: all ok (80 90)" in result.stdout
    resources = [line for line in result.stdout.splitlines() if line.startswith("  sm_90 ")]
    assert len(resources) == len(kernels.all_names())
    assert all("0 B spill stores, 0 B spill loads" in line for line in resources)


def _nvrtc_reason() -> str | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as error:
        return f"NVRTC unavailable ({type(error).__name__}: {error})"
    return None


def test_warm_kernels_names_one_kernel_of_every_module():
    spec = importlib.util.spec_from_file_location(
        "warm_kernels", PLUGIN_DIR / "tools" / "warm_kernels.py"
    )
    warm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(warm)
    leaders = warm.module_leaders()
    modules = [kernels.module_names(name) for name in leaders]
    assert len(set(modules)) == len(modules)
    assert set(modules) == {kernels.module_names(name) for name in kernels.all_names()}
    assert [len(m) for m in modules] == sorted((len(m) for m in modules), reverse=True)


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
        "modules = {kernels.module_names(n) for n in kernels.all_names()}\n"
        "for arch in ('80', '90'):\n"
        "    for names in sorted(modules):\n"
        "        binary, mapping = compiler.compile_using_nvrtc(\n"
        "            kernels.source(), options, arch, name_expressions=names)\n"
        "        assert binary and sorted(mapping) == sorted(names), mapping\n"
        "print('compiled', 2 * len(modules))"
    )
    # A forward and a multi-level forward module per dtype pair, a backward and a multi-level
    # backward module per dtype, the ROI grouping's module, the channels_last copy's and the
    # tables of maxima's.
    assert out == f"compiled {2 * (2 * (len(kernels.FORWARD_PAIRS) + 4) + 3)}"
