"""The CuPy backend on a CUDA device (skipped without one): its `forward` and `backward` methods
on torch's current stream, large shared-memory planes, the bad-ROI log in pinned host memory,
torchvision's results, offsets past 2^31 elements and `roi_ops.roi_pool` end to end."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from cupy_harness import GPU_ONLY
from roi_ops import bad_rois
from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
from roi_ops.testing import assert_same_bits, poisoned_forward
from roi_ops.testing.reference import reference_roi_pool, reference_roi_pool_backward

from roi_ops_cupy import kernels, planning
from roi_ops_cupy.tuning import DEFAULT_TUNING

pytestmark = GPU_ONLY


def _forward(backend, x, rois, size, scale, needs_argmax=True, log=None):
    problem = RoIPoolProblem(x, rois, size[0], size[1], scale, needs_argmax, bad_roi_log=log)
    return poisoned_forward(backend, problem)


def _backward(launcher_or_backend, grad, argmax, rois, shape, dtype, memory_format):
    problem = RoIPoolBackwardProblem(grad, argmax, rois, shape, dtype, memory_format)
    return launcher_or_backend.backward(problem)


def _detection_rois(num_images, count, height, width, scale, g, dtype=torch.float32):
    boxes = torch.rand(count, 4, generator=g, dtype=torch.float64)
    boxes[:, 0::2] *= width / scale
    boxes[:, 1::2] *= height / scale
    low = torch.minimum(boxes[:, :2], boxes[:, 2:])
    high = torch.maximum(boxes[:, :2], boxes[:, 2:])
    batch = torch.randint(0, num_images, (count, 1), generator=g).double()
    return torch.cat([batch, low, high], dim=1).to(dtype)


def test_forward_on_a_side_stream(cuda_backend):
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
        output, argmax = _forward(cuda_backend, features, rois_gpu, (7, 7), 0.5)
    torch.cuda.synchronize()
    assert_same_bits(output.cpu(), expected)
    assert torch.equal(argmax.cpu(), expected_argmax)


@pytest.mark.parametrize("pinned", [True, False], ids=["pinned-host-log", "device-log"])
def test_bad_roi_log_without_waiting(cuda_backend, pinned):
    """The kernels record the first invalid row into a pinned host log (or a device one) that
    roi_ops reads later; the call itself does not synchronise."""
    g = torch.Generator().manual_seed(22)
    x = torch.randn(2, 32, 20, 24, generator=g).cuda()
    rois = _detection_rois(2, 50, 20, 24, 0.5, g)
    rois[17, 3] = math.nan
    rois[9, 0] = 2.0  # batch index N: the first invalid row
    rois[31, 0] = -1.0
    log = bad_rois.new_log("cpu" if pinned else "cuda", pin_memory=pinned)
    rois_gpu = rois.cuda()  # a copy from pageable memory synchronises: before the check
    side = torch.cuda.Stream()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for needs_argmax in (True, False):
            _forward(cuda_backend, x, rois_gpu, (7, 7), 0.5, needs_argmax, log)
            with torch.cuda.stream(side):  # not on the default stream either
                torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
                _forward(cuda_backend, x, rois_gpu, (7, 7), 0.5, needs_argmax, log)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    expected = bad_rois.new_log()
    bad_rois.record_bad_rois(expected, rois, 2)
    assert torch.equal(log.cpu(), expected)
    assert bad_rois.decode(log.cpu()).row == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("kernel", kernels.BACKWARD_KERNELS)
@pytest.mark.parametrize("layout", ["auto", "channels_last", "contiguous"])
def test_backward_with_planes_that_fill_shared_memory(cuda_backend, dtype, kernel, layout):
    """A 160 x 200 gradient plane (125 KB of float32 sums): the planes kernel runs one
    1024-thread block per SM with the shared-memory opt-in; against the scalar reference. The
    gradient of a channels_last input comes back channels_last (it fits in L2: "auto"), or in
    the layout forced by the tuning; batch indices come from rows with NaN, -1 and fractions."""
    from roi_ops.device_info import cuda_sizes

    from roi_ops_cupy.launch import Launcher

    g = torch.Generator().manual_seed(23)
    shape = (2, 3, 160, 200)
    x = torch.randn(shape, generator=g).to(dtype)
    rois = _detection_rois(2, 300, 160, 200, 0.5, g)
    rois[:, 0] += 0.5
    rois[::29, 0] = math.nan
    rois[::31, 0] = -1.0
    rois = rois.to(dtype) if dtype == torch.float16 else rois
    _, argmax = reference_roi_pool(x, rois, (7, 7), 0.5)
    grad = torch.randint(-3, 4, argmax.shape, generator=g).to(dtype)  # exact sums
    expected = reference_roi_pool_backward(grad, argmax, rois, shape).to(dtype)
    shared_limit = cuda_sizes(torch.cuda.current_device()).shared_per_block_optin
    plane_bytes = 160 * 200 * 4
    if plane_bytes + planning.PLANES_STATIC_SHARED + 8 * 49 > shared_limit:
        pytest.skip(f"this device gives a block {shared_limit} B of shared memory")
    assert planning.planes_threads(plane_bytes + 8 * 49, shared_limit) == 1024
    tuning = replace(DEFAULT_TUNING, backward_kernel=kernel)  # 6 planes: too few to choose
    if layout != "auto":
        tuning = replace(tuning, channels_last_gradient=layout == "channels_last")
    launcher = Launcher(tuning)
    args = (grad.cuda(), argmax.cuda(), rois.cuda(), shape, dtype)
    result = _backward(launcher, *args, torch.channels_last)
    channels_last = layout != "contiguous"
    assert result.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(result.cpu(), expected)
    result = _backward(launcher, *args, torch.contiguous_format)
    assert result.is_contiguous() and torch.equal(result.cpu(), expected)
    assert bool(expected.ne(0).sum() > 1000)  # real sums, not zeros


def test_planes_backward_opts_in_below_the_default_shared_memory():
    """A 100 x 112 float32 plane: 45 KB of dynamic shared memory, under the 48 KiB a block gets
    without opting in, but over it with the kernel's 4 KB of static arrays. The launch opts in
    for any dynamic size."""
    from roi_ops_cupy.launch import Launcher

    g = torch.Generator().manual_seed(24)
    shape = (2, 3, 100, 112)
    dynamic = 100 * 112 * 4 + 8 * 49
    assert dynamic <= planning.DEFAULT_SHARED_LIMIT < dynamic + planning.PLANES_STATIC_SHARED
    x = torch.randn(shape, generator=g)
    rois = _detection_rois(2, 200, 100, 112, 0.5, g)
    _, argmax = reference_roi_pool(x, rois, (7, 7), 0.5)
    grad = torch.randint(-3, 4, argmax.shape, generator=g).float()  # exact sums
    expected = reference_roi_pool_backward(grad, argmax, rois, shape)
    launcher = Launcher(replace(DEFAULT_TUNING, backward_kernel=kernels.BACKWARD_PLANES))
    result = _backward(
        launcher, grad.cuda(), argmax.cuda(), rois.cuda(), shape, torch.float32,
        torch.contiguous_format,
    )  # fmt: skip
    assert torch.equal(result.cpu(), expected)
    assert bool(expected.ne(0).sum() > 1000)  # real sums, not zeros


def test_backend_backward(cuda_backend):
    argmax = torch.tensor([[[[0, 3]]], [[[2, -1]]]], dtype=torch.int32, device="cuda")
    grad = torch.tensor([[[[1.0, 2.0]]], [[[4.0, 8.0]]]], device="cuda")
    rois = torch.tensor([[1.7, 0, 0, 1, 1], [0, 0, 0, 1, 1]], device="cuda")
    result = _backward(
        cuda_backend, grad, argmax, rois, (2, 1, 2, 2), torch.float32, torch.contiguous_format
    )
    assert result.tolist() == [[[[0.0, 0.0], [4.0, 0.0]]], [[[1.0, 0.0], [0.0, 2.0]]]]


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
        output, _ = _forward(cuda_backend, x, rois, size, scale)
        expected = torchvision.ops.roi_pool(x, rois, size, scale)
        assert torch.equal(output, expected)


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
    output, argmax = _forward(cuda_backend, x, rois, (7, 7), 1.0)
    expected, expected_argmax = reference_roi_pool(
        patch, torch.tensor([[0, 0.0, 0.0, 13.0, 13.0]]), (7, 7), 1.0
    )
    assert_same_bits(output.cpu(), expected)
    rows, cols = expected_argmax // 14, expected_argmax % 14
    assert torch.equal(argmax.cpu(), ((rows + side - 14) * side + cols + side - 14).int())


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_small_rois_on_nchw_inputs_pool_a_channels_last_copy(dtype):
    """Many small ROIs of few outputs on an NCHW map that fits in L2: the launcher pools a
    channels_last copy (the copy kernel's) with the small_cvec kernel (the plan says so), bit
    for bit the reference's, both modes, on tie-heavy inputs; the input itself is left as it
    was."""
    from roi_ops.testing import tie_heavy_features

    from roi_ops_cupy import launch

    launcher = launch.Launcher()
    g = torch.Generator().manual_seed(41)
    x = tie_heavy_features((2, 64, 30, 41), 43, dtype).cuda()
    before = x.clone()
    rois = _detection_rois(2, 300, 30, 41, 0.5, g, dtype).cuda()
    for needs_argmax in (True, False):
        problem = RoIPoolProblem(x, rois, 3, 3, 0.5, needs_argmax)
        output, argmax = poisoned_forward(launcher, problem)
        expected, expected_argmax = reference_roi_pool(x.cpu(), rois.cpu(), (3, 3), 0.5)
        assert_same_bits(output.cpu(), expected)
        if needs_argmax:
            assert torch.equal(argmax.cpu(), expected_argmax)
    (packed, staged, copy, _), *_ = launcher._forward.values()
    assert staged and packed.name.startswith(kernels.FORWARD_SMALL_CVEC)
    assert copy.name == kernels.copy_name(dtype)
    assert_same_bits(x, before)
    # Switched off, the same call pools the NCHW input with the small kernel.
    unstaged = launch.Launcher(replace(DEFAULT_TUNING, stage_channels_last=False))
    output, _ = poisoned_forward(unstaged, RoIPoolProblem(x, rois, 3, 3, 0.5, False))
    assert_same_bits(output.cpu(), expected)
    (packed, staged, copy, _), *_ = unstaged._forward.values()
    assert not staged and copy is None and packed.name.startswith(kernels.FORWARD_SMALL + "<")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_staged_forward_of_large_rois_and_row_gaps(dtype):
    """Staging forced where the rule would not stage (ROIs of 7 x 7 bins: the cvec kernel reads
    the copy), from an NCHW input whose rows are further apart than dense (the first columns of
    a wider map): bit for bit the reference's, both modes, on tie-heavy inputs."""
    from roi_ops.testing import tie_heavy_features

    from roi_ops_cupy import launch

    launcher = launch.Launcher(replace(DEFAULT_TUNING, stage_channels_last=True))
    g = torch.Generator().manual_seed(43)
    wide_map = tie_heavy_features((2, 40, 23, 37), 44, dtype).cuda()
    x = wide_map[..., :29]
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    rois = _detection_rois(2, 200, 23, 29, 0.5, g, rois_dtype).cuda()
    expected, expected_argmax = reference_roi_pool(x.cpu(), rois.cpu(), (7, 7), 0.5)
    for needs_argmax in (True, False):
        problem = RoIPoolProblem(x, rois, 7, 7, 0.5, needs_argmax)
        output, argmax = poisoned_forward(launcher, problem)
        assert_same_bits(output.cpu(), expected)
        if needs_argmax:
            assert torch.equal(argmax.cpu(), expected_argmax)
    for packed, staged, copy, _ in launcher._forward.values():
        assert staged and packed.name.startswith(
            (kernels.FORWARD_CVEC + "<", kernels.FORWARD_CVEC_WIDE + "<")
        )
        assert copy.name == kernels.copy_name(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_inference_through_tables_of_maxima(dtype, layout, monkeypatch):
    """The launcher's tables of maxima (decision, build, cvec kernel reading them) on large ROIs
    of a channels_last map and of the staged copy of an NCHW one, on a side stream with the
    buffers' memory reused from call to call: bit for bit the reference's on tie-heavy inputs;
    decided yes on the device (the rule, large bins; an L2 of 0 so that the small map counts as
    beyond it), and no with the threshold out of reach (same bits, from the map)."""
    from roi_ops.testing import tie_heavy_features

    from roi_ops_cupy import launch

    real_sizes = launch.cuda_sizes
    monkeypatch.setattr(launch, "cuda_sizes", lambda d: real_sizes(d)._replace(l2_bytes=0))

    g = torch.Generator().manual_seed(47)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = tie_heavy_features((2, 64, 37, 45), 48, dtype).cuda().contiguous(memory_format=fmt)
    rois_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    rois = _detection_rois(2, 400, 37, 45, 1.0, g, rois_dtype).cuda()
    expected, _ = reference_roi_pool(x.cpu(), rois.cpu(), (7, 7), 1.0)
    staging = layout == "contiguous"
    base = replace(DEFAULT_TUNING, table_min_outputs=0, stage_channels_last=staging or None)
    for tuning in (
        base,
        replace(base, max_tables=True),
        replace(base, table_min_saved_reads=1e12),
    ):
        launcher = launch.Launcher(tuning)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for _ in range(3):
                output, _ = poisoned_forward(launcher, RoIPoolProblem(x, rois, 7, 7, 1.0, False))
        stream.synchronize()
        assert_same_bits(output.cpu(), expected)
        (_, staged, _, tables), *_ = launcher._forward.values()
        assert staged == staging and tables is not None
