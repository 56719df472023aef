"""The Triton backend against the scalar reference, bit for bit.

Without a GPU the kernels run in Triton's CPU interpreter on CPU tensors (``TRITON_INTERPRET=1``
is set for this module only: while set, ``auto`` would pick Triton for every CPU call). With a
GPU, and no ``TRITON_INTERPRET`` in the environment, the same tests run the compiled kernels on
CUDA tensors. Shapes are tiny because the interpreter is slow.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import torch

_CUDA = torch.cuda.is_available()
_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
INTERPRET = _PREVIOUS_INTERPRET == "1" or not _CUDA
if INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton and the kernels are first imported

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from roi_ops.backend import RoIPoolProblem  # noqa: E402
from roi_ops.registry import REGISTRY  # noqa: E402
from roi_ops.testing import (  # noqa: E402
    BackendConformance,
    contract_cases,
    reference_roi_pool,
    reference_roi_pool_backward,
    roi_pool_cases,
    tie_heavy_features,
)

triton = pytest.importorskip("triton")
backend_module = pytest.importorskip("roi_ops_triton.backend")
kernels = pytest.importorskip("roi_ops_triton.kernels")
if INTERPRET and type(kernels._roi_pool_fwd_kernel).__name__ != "InterpretedFunction":
    kernels = importlib.reload(kernels)  # imported earlier in compiled mode: redo it interpreted
if _PREVIOUS_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)  # the fixture below sets it around this module only

TritonBackend = backend_module.TritonBackend

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DTYPE_IDS = ["float16", "bfloat16", "float32", "float64"]
LAYOUTS = ["contiguous", "channels_last"]
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DEVICES = (["cpu"] if INTERPRET else []) + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if _CUDA else []
)
_BIT_VIEWS = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


@pytest.fixture(scope="module", autouse=True)
def _interpreter_environment():
    """TRITON_INTERPRET=1 while this module runs (without a GPU), and a fresh registry."""
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    REGISTRY.reset()  # availability is cached per process; recompute it under this environment
    yield
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET
    REGISTRY.reset()


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _rois_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 else dtype


def run_forward(
    x: torch.Tensor,
    rois: torch.Tensor,
    size: tuple[int, int],
    scale: float,
    needs_argmax: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call the backend directly on outputs poisoned with NaN and -7."""
    problem = RoIPoolProblem(x, rois, size[0], size[1], scale, needs_argmax)
    backend = TritonBackend()
    assert backend.check_available() is None
    assert backend.not_supported_reasons(problem) == []
    output = torch.full(problem.output_shape, math.nan, dtype=x.dtype, device=x.device)
    argmax = None
    if needs_argmax:
        argmax = torch.full(problem.output_shape, -7, dtype=torch.int32, device=x.device)
    backend.forward(problem, output, argmax)
    return output, argmax


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit equality (so -0.0 differs from +0.0); NaNs must match in place, not in payload."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = _BIT_VIEWS[actual.dtype]
    nan = expected.isnan()
    mismatch = (actual.isnan() != nan) | (~nan & (actual.view(bits) != expected.view(bits)))
    if mismatch.any():
        where = mismatch.nonzero()[:5].tolist()
        pytest.fail(f"{int(mismatch.sum())} elements differ, e.g. at {where}")


def check(
    x: torch.Tensor, rois: torch.Tensor, size: int | tuple[int, int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compare training (with argmax) and inference forwards with the reference."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    expected, expected_argmax = reference_roi_pool(x, rois, size, scale)
    output, argmax = run_forward(x, rois, size, scale)
    assert_same_bits(output, expected)
    assert torch.equal(argmax.cpu(), expected_argmax), "argmax differs from the reference"
    inference, _ = run_forward(x, rois, size, scale, needs_argmax=False)
    assert_same_bits(inference, expected)
    return expected, expected_argmax


def embedded(x: torch.Tensor, layout: str) -> torch.Tensor:
    """`x` as a view inside a NaN-filled buffer: a read past any edge would show up as NaN."""
    n, c, h, w = x.shape
    if layout == "channels_last":
        buffer = torch.full((n + 2, h + 2, w + 2, c + 2), math.nan, dtype=x.dtype, device=x.device)
        view = buffer[1 : n + 1, 1 : h + 1, 1 : w + 1, 1 : c + 1].permute(0, 3, 1, 2)
    else:
        buffer = torch.full((n + 2, c + 2, h + 2, w + 2), math.nan, dtype=x.dtype, device=x.device)
        view = buffer[1 : n + 1, 1 : c + 1, 1 : h + 1, 1 : w + 1]
    view.copy_(x)
    return view


# --------------------------------------------------------------------------------------------
# The contract's cases, every dtype and layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_contract_cases(device, dtype):
    """Scales 1/16 and 0.5, .5 rounding, off-map/inverted, ties, NaN/-inf, float edges, K=0,
    invalid rows and huge coordinates (the kernel has no value checks to rely on), channels_last
    here; the conformance kit below runs the same cases contiguous, through roi_ops.roi_pool."""
    for case in contract_cases(device, dtype):
        x = _layout(case.input, "channels_last")
        check(x, case.rois_tensor(), case.output_size, case.spatial_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_float32_rois_with_half_input(device, dtype):
    for case in contract_cases(device, dtype, seed=3, rois_dtype=torch.float32):
        check(case.input, case.rois_tensor(), case.output_size, case.spatial_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_no_read_outside_the_input(device, layout, dtype):
    """Invalid batch indices, NaN/inf and huge coordinates on a view inside a NaN buffer."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 9, 5, 6, generator=g) * 3).to(dtype).to(device)
    big = 6e4 if dtype == torch.float16 else 1e30
    rows = [
        [2.0, 0, 0, 3, 3],
        [-1.0, 0, 0, 3, 3],
        [-0.9, 0, 0, 9, 9],
        [1.999, -3, -3, 99, 99],
        [0.0, math.nan, 0, 3, 3],
        [1.0, 0, 0, math.inf, 3],
        [math.inf, 0, 0, 3, 3],
        [0.0, -big, -big, big, big],
        [1.0, big, big, -big, -big],
        [1.0, -big, 2.0, 3.0, big],
        [0.0, 5, 4, 5, 4],
        [1.0, 6, 5, 60, 50],
    ]
    rois = torch.tensor(rows, dtype=torch.float64).to(dtype).to(device)
    check(embedded(x, layout), rois, (2, 3), 1.0)


# --------------------------------------------------------------------------------------------
# Targeted traps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bin_edges_exposed_by_monotone_features(device, dtype):
    """Features increasing along rows and columns put each bin's argmax on its last pixel (and,
    negated, on its first), so any bin edge off by one shows. Many ROIs, several scales."""
    g = torch.Generator().manual_seed(5)
    height, width = 23, 29
    ramp = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
    rdt = _rois_dtype(dtype)
    count = 8
    boxes = torch.rand(count, 4, generator=g, dtype=torch.float64) * 60 - 10
    boxes[: count // 3] = boxes[: count // 3].round() + 0.5  # exact halves before scaling
    low = torch.minimum(boxes[:, :2], boxes[:, 2:])
    high = torch.maximum(boxes[:, :2], boxes[:, 2:])
    rois = torch.cat([torch.zeros(count, 1, dtype=torch.float64), low, high], 1)
    for values in (ramp, -ramp):
        # float16 and bfloat16 cannot hold 667 distinct integers: scale into a safe range.
        x = (values / 8).round() if dtype in (torch.float16, torch.bfloat16) else values
        x = x.to(dtype).to(device)
        for scale, size in ((0.5, (7, 7)), (1 / 3, (3, 5)), (0.25, (2, 3))):
            check(x, rois.to(rdt).to(device), size, scale)


@pytest.mark.parametrize("device", DEVICES)
def test_float_edge_last_bin_is_longer(device):
    """float32, roi height 57, PH 7: the last bin ends at ceil(7 * 8.142857) = 58 rows."""
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 64, 1).repeat(1, 1, 1, 2)
    rois = torch.tensor([[0.0, 0.0, 0.0, 1.0, 56.0]])
    _, argmax = check(x.to(device), rois.to(device), (7, 1), 1.0)
    assert argmax[0, 0, -1, 0].item() == 57 * 2  # row 57, one past 57 * 7 / 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_signed_zero_nan_and_subnormal_order(device, dtype):
    """First maximum among -0.0 and +0.0; first NaN wins over +inf; subnormals are ordered
    (a flush-to-zero comparison would call them equal)."""
    tiny = torch.finfo(dtype).tiny
    x = torch.zeros(1, 4, 2, 4, dtype=torch.float64)
    x[0, 0] = torch.tensor([[-0.0, 0.0, -1.0, -0.0], [0.0, -0.0, -2.0, -3.0]])
    x[0, 1] = torch.tensor([[1.0, math.inf, 2.0, math.nan], [math.nan, 3.0, math.inf, 0.0]])
    x[0, 2] = torch.tensor([[tiny / 4, tiny / 2, -tiny / 2, tiny / 8], [0.0, tiny / 4, -0.0, 0]])
    x[0, 3] = torch.tensor([[-math.inf] * 4, [-math.inf, -math.inf, 1.0, -math.inf]])
    x = x.to(dtype)
    if dtype == torch.bfloat16:
        x[0, 2] = x[0, 2].float().to(dtype)  # keep the subnormals that bfloat16 can hold
    rois = torch.tensor([[0.0, 0, 0, 3, 1], [0.0, 0, 0, 1, 1], [0.0, 2, 0, 3, 1]])
    for size in ((1, 1), (2, 2), (1, 2)):
        check(x.to(device), rois.to(_rois_dtype(dtype)).to(device), size, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels", [16, 24, 68])
def test_channels_last_kernel_on_ties_and_specials(device, dtype, channels):
    """The channels_last kernel with whole channel blocks (16: every dtype's BLOCK_C divides it
    or exceeds it), a partial last block, several blocks; ties, signed zeros, NaN and -inf;
    bins at the border, empty bins, a bad ROI. On the GPU the aligned inputs take 16-byte loads,
    the embedded (offset) one does not."""
    x = tie_heavy_features((2, channels, 9, 13), 17, dtype)
    rois = torch.tensor(
        [
            [0.0, 0, 0, 12, 8],
            [1.0, 2.5, 1, 9, 7.5],
            [1.0, -4, 3, 30, 20],
            [0.0, 5, 5, 5, 5],
            [3.0, 1, 1, 4, 4],
        ],
        dtype=torch.float64,
    ).to(_rois_dtype(dtype))
    assert kernels.forward_config(_layout(x, "channels_last"), 7, 7).channels_fast
    for placed in (_layout(x, "channels_last"), embedded(x, "channels_last")):
        for size in ((7, 7), (3, 2), (9, 13)):
            check(placed.to(device), rois.to(device), size, 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_half_geometry_rounding(device, dtype):
    """Coordinates and scales whose products round differently in float16 and float32."""
    x = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(2)).to(dtype)
    coords = torch.tensor(
        [
            [0.0, 2047.0, 1025.0, 2049.0, 2051.0],
            [0.0, 300.3, 133.7, 615.9, 627.1],
            [0.0, 0.49999997, 1.5, 2.5, 3.4999998],
            [0.0, 61.9, 7.77, 63.99, 65.0],
            [0.0, -1.5, -2.5, 70000.0, 1e5],
        ],
        dtype=torch.float64,
    )
    for scale in (1 / 16, 1 / 3, 0.0625001, 1 / 7):
        check(x.to(device), coords.to(dtype).to(device), (3, 7), scale)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_degenerate_shapes(device):
    x = torch.randn(2, 3, 4, 5).to(device)
    check(x, torch.empty(0, 5, device=device), (2, 2), 1.0)  # K = 0
    check(x[:, :0], torch.tensor([[0.0, 0, 0, 3, 3]], device=device), (2, 2), 1.0)  # C = 0
    check(x[:, :, :0], torch.tensor([[0.0, 0, 0, 3, 3]], device=device), (2, 2), 1.0)  # H = 0
    check(
        torch.randn(1, 1, 1, 1).to(device),
        torch.tensor([[0.0, 0, 0, 0, 0]], device=device),
        (3, 2),
        1.0,
    )


# --------------------------------------------------------------------------------------------
# Every tile shape and launch path
# --------------------------------------------------------------------------------------------

CONFIGS = [
    "unit=0,split=1",
    "unit=0,split=2",
    "unit=0,split=8",
    "unit=0,block_b=16",
    "unit=0,block_b=16,split=4",
    "block_b=4,num_warps=1",  # unit kernel: fewer lanes than bins (several bin rounds)
    "block_b=16,block_elements=8",  # unit kernel: two lane groups, one round per program
    "block_b=64,num_warps=2,block_elements=24",  # ten groups, rounds past the channel count
    "channels_fast=1,block_c=8,block_b=16",
    "channels_fast=1,block_c=4,block_b=4",
    "channels_fast=1,block_c=16,block_b=64",
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_tile_configurations(device, layout, config, monkeypatch):
    """Each tile shape on both layouts, with several blocks per ROI and a split grid."""
    monkeypatch.setenv("ROI_OPS_TRITON_FWD", config)
    monkeypatch.setattr(kernels, "MAX_GRID_Y", 3)  # several launches with a block offset
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 9, 5, 19, generator=g).round()  # ties
    x[1, 2, 3, 4:9] = math.nan
    x[0, 4] = -math.inf
    rois = torch.tensor(
        [[0.0, 0, 0, 18, 4], [1.0, 2.5, 1, 16, 3.5], [1.0, 7, 2, 3, 1], [0.0, -3, 2, 30, 9]]
    )
    check(_layout(x, layout).to(device), rois.to(device), (2, 3), 1.0)


def test_forward_config_is_bounded():
    """Shape changes pick among a few variants: the unit kernel for a unit W stride, the
    channels-fast tile for channels_last, the flat tile otherwise."""
    for width in (1, 7, 30, 63, 100, 272, 5000):
        x = torch.empty(2, 256, 50, width)
        config = kernels.forward_config(x, 7, 7)
        assert config.unit and not config.channels_fast and config.split == 1
        assert config.block_b == kernels.UNIT_LANES
        last = kernels.forward_config(x.contiguous(memory_format=torch.channels_last), 7, 7)
        assert last.channels_fast and last.split == 1 and not last.unit
        strided = kernels.forward_config(torch.empty(2, 256, 50, 2 * width)[..., ::2], 7, 7)
        assert not strided.unit and not strided.channels_fast
        assert strided.split == 1 and strided.block_b <= 1024


def test_unit_channels_per_program():
    """Whole rounds of four channels per lane group, about the target outputs, enough programs."""
    # 49 bins in 256 lanes: 5 groups, rounds of 20 channels; 8192 // 49 = 167 -> 160.
    assert kernels.unit_channels_per_program(512, 1024, 49, 256, 132, 8192) == 160
    # Few ROIs: halved (in whole rounds) until 8 programs per SM, or one round.
    assert kernels.unit_channels_per_program(4, 1024, 49, 256, 132, 8192) == 20
    assert kernels.unit_channels_per_program(64, 256, 49, 256, 132, 8192) == 20
    # 196 bins: one group, rounds of 4 channels; never more channels than the input has (rounded
    # up to a round).
    assert kernels.unit_channels_per_program(1000, 256, 196, 256, 132, 1024) == 4
    assert kernels.unit_channels_per_program(1000, 3, 196, 256, 132, 8192) == 4
    # More bins than lanes: one group.
    assert kernels.unit_channels_per_program(1000, 64, 1024, 256, 1, 8192) == 8


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block", [None, 16], ids=["chosen-block", "block-16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_matches_the_reference_scatter(device, dtype, block, layout, monkeypatch):
    if block is not None:  # several programs per ROI, and a split grid
        monkeypatch.setattr(kernels, "backward_block", lambda *_: block)
        monkeypatch.setattr(kernels, "MAX_GRID_Y", 3)
    memory_format = MEMORY_FORMATS[layout]
    monkeypatch.setenv(kernels.GRADIENT_LAYOUT_ENV, "channels_last")  # whatever the sizes
    case = contract_cases(device, dtype, seed=4)[0]
    shape = tuple(case.input.shape)
    assert shape[1] > 1 and shape[2] * shape[3] > 1  # the two layouts differ
    rois = case.rois_tensor()
    size = (case.output_size,) * 2 if isinstance(case.output_size, int) else case.output_size
    _, argmax = run_forward(case.input, rois, size, case.spatial_scale)
    g = torch.Generator().manual_seed(1)
    grad_output = torch.randint(1, 5, argmax.shape, generator=g).to(dtype).to(device)
    batch_index = rois[:, 0].double().trunc().long().clamp(0, case.input.shape[0] - 1)
    backend = TritonBackend()

    def backward(grad):
        result = backend.backward(grad, argmax, batch_index, shape, dtype, memory_format)
        assert result.dtype == dtype and result.is_contiguous(memory_format=memory_format)
        return result.cpu().double()

    expected = reference_roi_pool_backward(grad_output, argmax, rois, shape)
    assert torch.equal(backward(grad_output), expected)
    # Zero strides (an expanded gradient) and a transposed one.
    ones = torch.ones((), dtype=dtype, device=device).expand(argmax.shape)
    assert torch.equal(backward(ones), reference_roi_pool_backward(ones, argmax, rois, shape))
    flipped = grad_output.transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(backward(flipped), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_gradient_when_the_input_outnumbers_grad_output(device, monkeypatch):
    assert kernels.channels_last_gradient(111_411_200, 51_380_224)  # fpn-p2
    assert not kernels.channels_last_gradient(6_963_200, 205_520_896)  # mask-14
    monkeypatch.setenv(kernels.GRADIENT_LAYOUT_ENV, "channels_last")
    assert kernels.channels_last_gradient(1, 2)
    monkeypatch.setenv(kernels.GRADIENT_LAYOUT_ENV, "contiguous")
    assert not kernels.channels_last_gradient(2, 1)
    monkeypatch.delenv(kernels.GRADIENT_LAYOUT_ENV)
    shape = (1, 3, 4, 4)
    argmax = torch.zeros(5, 3, 2, 2, dtype=torch.int32, device=device)  # 60 outputs, 48 inputs
    batch_index = torch.zeros(5, dtype=torch.int64, device=device)
    grad_output = torch.ones(5, 3, 2, 2, device=device)
    grad = TritonBackend().backward(
        grad_output, argmax, batch_index, shape, torch.float32, torch.channels_last
    )
    assert grad.is_contiguous() and grad[0, :, 0, 0].tolist() == [20.0] * 3


def test_backward_block_follows_the_l2_fit():
    assert kernels.backward_block(10 * 2**20, 50 * 2**20) == kernels.BACKWARD_BLOCK
    assert kernels.backward_block(60 * 2**20, 50 * 2**20) == kernels.BACKWARD_BLOCK_STREAMED
    assert kernels.backward_block(1, 0) == kernels.BACKWARD_BLOCK_STREAMED  # L2 unknown


def test_backward_defers_to_the_shared_one_when_deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        argmax = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
        grad = TritonBackend().backward(
            torch.ones(1, 1, 1, 1),
            argmax,
            torch.zeros(1, dtype=torch.long),
            (1, 1, 1, 1),
            torch.float32,
        )
    finally:
        torch.use_deterministic_algorithms(previous)
    assert grad is None


# --------------------------------------------------------------------------------------------
# Hypothesis differential test and the core's conformance kit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_hypothesis_differential(device):
    @settings(
        max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(roi_pool_cases(max_side=8, max_rois=4))
    def run(case) -> None:
        layout = "channels_last" if case.input.shape[1] > 1 and case.input.numel() % 2 else "c"
        check(
            _layout(case.input, layout).to(device),
            case.rois_tensor().to(device),
            case.output_size,
            case.spatial_scale,
        )

    run()


class TestTritonConformance(BackendConformance):
    """The core's conformance kit through ``roi_ops.roi_pool(..., backend="triton")``."""

    hypothesis_examples = 8

    @pytest.fixture
    def backend_name(self) -> str:
        return "triton"


# --------------------------------------------------------------------------------------------
# Packaging and availability
# --------------------------------------------------------------------------------------------


def test_backend_module_does_not_import_triton():
    code = "import sys, roi_ops_triton.backend; assert 'triton' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_accepted_only_under_the_interpreter(monkeypatch):
    problem = RoIPoolProblem(torch.zeros(1, 1, 2, 2), torch.zeros(1, 5), 1, 1, 1.0, True)
    backend = TritonBackend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.not_supported_reasons(problem) == []
    assert backend.check_available() is None
    assert backend.device_types == frozenset({"cuda"})  # so `auto` never picks the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    reasons = backend.not_supported_reasons(problem)
    assert len(reasons) == 1 and "cpu" in reasons[0]
    assert TritonBackend.device_types == frozenset({"cuda"})
    if not _CUDA:
        assert "CUDA" in backend.check_available()


@pytest.mark.skipif(_CUDA, reason="with a GPU the compiled kernels themselves are tested")
def test_compiles_for_sm90_with_exact_arithmetic():
    """Compile every variant for sm_90 without a GPU; the PTX must have no fused multiply-add,
    only correctly rounded divisions and no flush-to-zero comparisons (roi_ops_triton.ptx_check).
    """
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not (os.path.exists(ptxas) or os.environ.get("TRITON_PTXAS_PATH")):
        pytest.skip("Triton's NVIDIA backend has no ptxas here")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "roi_ops_triton.ptx_check"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_registered_through_the_entry_point():
    entry = REGISTRY.get("triton")
    assert entry is not None and entry.distribution == "roi-ops-triton"
    assert REGISTRY.availability(entry) is None or not INTERPRET


# --------------------------------------------------------------------------------------------
# GPU only: recompilation and 64-bit offsets
# --------------------------------------------------------------------------------------------


def _compiled_variants() -> int | None:
    # Triton 3.x: device_caches[device] = (kernel_cache, ...); other layouts skip the test.
    total = 0
    for kernel in (kernels._roi_pool_fwd_kernel, kernels._roi_pool_fwd_unit_kernel):
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            return None
        try:
            total += sum(len(entry[0]) for entry in caches.values())
        except (TypeError, IndexError, AttributeError):
            return None
    return total


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA or INTERPRET, reason="needs compiled kernels on a CUDA device")
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_float16_results_keep_the_bits_of_the_winner(layout):
    """Every float16 output is the bits of the input element its argmax names, NaN payloads
    (quiet, signalling, negative) included, in training and inference, for the unit kernel
    (contiguous) and the flat tile (a W stride of 2)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 9, 14, generator=g).round().half()
    payloads = torch.tensor([0x7E01, 0x7D00, -0x0200, 0x7C01, 0x7FFF], dtype=torch.int16)
    where = torch.rand(x.shape, generator=g) < 0.04
    picks = payloads[torch.randint(0, len(payloads), (int(where.sum()),), generator=g)]
    x.view(torch.int16)[where] = picks
    if layout == "strided":
        wide = torch.full((2, 12, 9, 28), math.nan, dtype=torch.float16)
        wide[..., ::2] = x
        x = wide[..., ::2]
    x = x.cuda()
    rois = torch.tensor(
        [[0.0, 0, 0, 13, 8], [1.0, 2.5, 1, 11, 7.5], [1.0, 3, 2, 5, 4], [0.0, -3, 2, 30, 9]]
    ).half()
    output, argmax = run_forward(x, rois.cuda(), (3, 4), 1.0)
    inference, _ = run_forward(x, rois.cuda(), (3, 4), 1.0, needs_argmax=False)
    planes = x.cpu().contiguous().view(torch.int16).flatten(2)  # (N, C, H * W)
    batch = rois[:, 0].long()[:, None, None, None].expand(argmax.shape)
    channel = torch.arange(12)[None, :, None, None].expand(argmax.shape)
    index = argmax.cpu().long()
    winners = planes[batch, channel, index.clamp(min=0)]
    filled = index >= 0
    assert filled.sum() > 100 and x.isnan().any()
    assert torch.equal(output.cpu().view(torch.int16)[filled], winners[filled])
    assert torch.equal(inference.cpu().view(torch.int16), output.cpu().view(torch.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA or INTERPRET, reason="needs compiled kernels on a CUDA device")
def test_no_recompilation_when_shapes_change():
    g = torch.Generator().manual_seed(0)

    def call(n, h, w, k):
        x = torch.randn(n, 16, h, w, generator=g).cuda()
        rois = torch.cat([torch.randint(0, n, (k, 1)), torch.rand(k, 4) * 40], 1).cuda()
        run_forward(x, rois, (7, 7), 1 / 4)

    call(2, 30, 40, 5)  # split 1 for both 40 and 47 columns below
    before = _compiled_variants()
    if before is None:
        pytest.skip("this Triton version does not expose its kernel cache")
    for n, h, w, k in ((1, 31, 41, 1), (3, 32, 47, 16), (5, 17, 33, 300), (2, 48, 48, 4097)):
        call(n, h, w, k)
    assert _compiled_variants() == before


@pytest.mark.gpu
@pytest.mark.skipif(not _CUDA or INTERPRET, reason="needs compiled kernels on a CUDA device")
def test_cached_launches_match_the_reference_as_keys_change(monkeypatch):
    """Launches that skip Triton's binding (roi_ops_triton.launcher) on calls whose dtypes,
    layouts, pointer alignments and shapes change from one to the next, each against the
    reference; the same calls bound by Triton every time give the same bits."""
    from roi_ops_triton import launcher

    monkeypatch.setattr(launcher, "enabled", True)
    launcher.clear()
    g = torch.Generator().manual_seed(5)
    calls = []
    for trial in range(24):
        dtype = DTYPES[trial % 4]
        n, c, h, w = 1 + trial % 3, 5 + trial % 4, 9 + trial % 5, 11 + trial % 6
        offset = trial % 3  # 0: a 16-byte aligned input; 1, 2: elements past the boundary
        buffer = torch.empty(n * c * h * w + offset, dtype=dtype, device="cuda")
        x = buffer[offset:].view(n, c, h, w)
        x.copy_(torch.randn(n, c, h, w, generator=g).to(dtype))
        if trial % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        k = 1 + 7 * trial
        rois = torch.cat([torch.randint(0, n, (k, 1), generator=g), torch.rand(k, 4, generator=g)
                          * 24], 1).to(_rois_dtype(dtype)).cuda()  # fmt: skip
        calls.append((x, rois))
    for x, rois in calls * 2:  # the second pass repeats every key
        check(x, rois, (3, 4), 0.5)
    direct = [entry for entry in launcher._compiled.values() if entry is not None]
    assert direct, "no launch went straight to a compiled kernel"
    monkeypatch.setattr(launcher, "enabled", False)
    for x, rois in calls[:8]:
        bound, bound_argmax = run_forward(x, rois, (3, 4), 0.5)
        monkeypatch.setattr(launcher, "enabled", True)
        cached, cached_argmax = run_forward(x, rois, (3, 4), 0.5)
        monkeypatch.setattr(launcher, "enabled", False)
        assert_same_bits(cached, bound.cpu())
        assert torch.equal(cached_argmax, bound_argmax)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not _CUDA or INTERPRET, reason="needs compiled kernels on a CUDA device")
def test_offsets_past_two_to_the_31():
    """An input and an output of more than 2^31 elements (64-bit offsets), float16."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 30 GiB of GPU memory")
    x = torch.randn(3, 1024, 768, 1024, dtype=torch.float16, device="cuda")  # 2.4e9 elements
    box = [1000.0, 700.0, 1023.0, 767.0]
    rois = torch.tensor([[2.0, *box]], device="cuda").half()
    output, argmax = run_forward(x, rois, (2, 2), 1.0)
    corner = x[2:, -2:].cpu()  # the last two planes, as image 0 of a small input
    expected, expected_argmax = reference_roi_pool(corner, torch.tensor([[0.0, *box]]), (2, 2))
    assert_same_bits(output[:, -2:], expected)
    assert torch.equal(argmax[:, -2:].cpu(), expected_argmax)
    del x, output, argmax
    many = 2**31 // (64 * 49) + 8  # K * C * PH * PW > 2^31 elements
    x = torch.randn(1, 64, 8, 8, dtype=torch.float16, device="cuda")
    rois = torch.tensor([[0.0, 1, 2, 6, 7]], device="cuda").half().expand(many, 5)
    output, argmax = run_forward(x, rois, (7, 7), 1.0)
    expected, expected_argmax = reference_roi_pool(x.cpu(), rois[:1].cpu(), (7, 7))
    assert_same_bits(output[-1:], expected)
    assert torch.equal(argmax[-1:].cpu(), expected_argmax)
