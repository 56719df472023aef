"""GPU-only checks: torchvision as an oracle, cross-backend equality on real workloads, streams,
CUDA graphs. Skipped without CUDA; run on the GPU machine by scripts/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch

import roi_ops
from roi_ops.bench.workloads import WORKLOADS, make_input, make_rois
from roi_ops.testing import check_case, contract_cases

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    probe = roi_ops.RoIPoolProblem(
        torch.empty(1, 1, 1, 1, device="cuda"), torch.zeros(1, 5, device="cuda"), 1, 1, 1.0, True
    )
    from roi_ops.dispatch import reasons_against
    from roi_ops.registry import REGISTRY

    return [e.name for e in REGISTRY.entries() if not reasons_against(e, probe)]


GPU_BACKENDS = _gpu_backends()


def _torchvision_ops():
    tv = pytest.importorskip("torchvision")
    return tv, torch.ops.torchvision.roi_pool


def _medium(workload: str):
    w = WORKLOADS[workload]
    from dataclasses import replace

    return replace(w, channels=min(w.channels, 64), num_rois=min(w.num_rois, 600))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_matches_torchvision_on_workloads(backend, dtype, workload):
    _, tv_roi_pool = _torchvision_ops()
    w = _medium(workload)
    x = make_input(w, dtype, "cuda", seed=3)
    rois = make_rois(w, dtype, "cuda", seed=4)
    expected, expected_argmax = tv_roi_pool(x, rois, w.spatial_scale, w.output_size, w.output_size)
    output, argmax = roi_ops.roi_pool_with_argmax(
        x, rois, w.output_size, w.spatial_scale, backend=backend
    )
    assert torch.equal(output, expected)
    assert torch.equal(argmax, expected_argmax.to(torch.int32))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_matches_torchvision_on_finite_contract_cases(backend, dtype):
    _, tv_roi_pool = _torchvision_ops()
    for case in contract_cases("cuda", dtype, seed=21):
        rois = case.rois_tensor()
        if case.needs_unchecked or not bool(torch.isfinite(case.input).all()):
            continue  # torchvision is undefined there
        expected, expected_argmax = tv_roi_pool(
            case.input,
            rois,
            case.spatial_scale,
            *((case.output_size,) * 2 if isinstance(case.output_size, int) else case.output_size),
        )
        output, argmax = roi_ops.roi_pool_with_argmax(
            case.input, case.rois, case.output_size, case.spatial_scale, backend=backend
        )
        assert torch.equal(output, expected), case
        assert torch.equal(argmax, expected_argmax.to(torch.int32)), case


def test_torch_backend_on_cuda_matches_reference():
    for dtype in DTYPES:
        for case in contract_cases("cuda", dtype, seed=8):
            check_case(case, "torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=[str(d)[6:] for d in DTYPES])
@pytest.mark.parametrize("workload", ["frcnn-c4", "mask-14", "big-batch"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_gpu_backends_agree_bitwise_on_workloads(dtype, workload, channels_last):
    if len(GPU_BACKENDS) < 2:
        pytest.skip("fewer than two GPU backends")
    w = _medium(workload)
    x = make_input(w, dtype, "cuda", seed=5, channels_last=channels_last)
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, "cuda", seed=6)
    results = {}
    for backend in GPU_BACKENDS:
        out, arg = roi_ops.roi_pool_with_argmax(
            x, rois, w.output_size, w.spatial_scale, backend=backend
        )
        results[backend] = (out, arg)
    (first, (out0, arg0)), *rest = results.items()
    for name, (out, arg) in rest:
        assert torch.equal(arg, arg0), f"{name} vs {first}: argmax"
        assert torch.equal(out.view(torch.int8), out0.view(torch.int8)), f"{name} vs {first}"


def _fpn_p4_call(backend: str):
    """(input, pool): fpn-p4's (medium) float32 input and rois on the GPU, and a call that pools
    them (7 x 7) on `backend`."""
    w = _medium("fpn-p4")
    x = make_input(w, torch.float32, "cuda")
    rois = make_rois(w, torch.float32, "cuda")
    return x, lambda: roi_ops.roi_pool(x, rois, 7, w.spatial_scale, backend=backend)


def _on_a_side_stream(call, times: int = 1):
    """The last result of `times` calls of `call` on a new stream that the current one waits for."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(times):
            result = call()
    torch.cuda.current_stream().wait_stream(stream)
    return result


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_non_default_stream(backend):
    _, pool = _fpn_p4_call(backend)
    expected = pool()
    out = _on_a_side_stream(pool, times=3)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    if backend == "torch":
        pytest.skip("the torch backend reads bin sizes on the host, which capture forbids")
    x, pool = _fpn_p4_call(backend)
    expected = pool()
    _on_a_side_stream(pool)  # warm-up / compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # value checks are skipped during capture
        captured = pool()
    x.mul_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, pool())
    assert not torch.equal(captured, expected)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_backward_on_workload(backend):
    w = _medium("big-batch")
    x = make_input(w, torch.float32, "cuda")
    rois = make_rois(w, torch.float32, "cuda")
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            leaf = x.clone().requires_grad_(True)
            out = roi_ops.roi_pool(leaf, rois, 7, w.spatial_scale, backend=backend)
            out.backward(
                torch.randn(
                    out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)
                )
            )
            grads.append(leaf.grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", [b for b in GPU_BACKENDS if b != "torch"])
def test_compile_reduce_overhead(backend):
    """torch.compile(mode="reduce-overhead") captures roi_pool in CUDA graphs and replays it."""
    torch._dynamo.reset()
    w = _medium("fpn-p4")
    rois = make_rois(w, torch.float32, "cuda")
    head = torch.compile(
        lambda a, b: roi_ops.roi_pool(a, b, 7, w.spatial_scale, backend=backend).relu() * 2,
        mode="reduce-overhead",
    )
    for seed in range(4):  # later calls replay the recorded graph with new input values
        x = make_input(w, torch.float32, "cuda", seed=seed)
        expected = roi_ops.roi_pool(x, rois, 7, w.spatial_scale, backend=backend).relu() * 2
        assert torch.equal(head(x, rois).clone(), expected)


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_more_than_2_31_elements_in_input_and_output(backend):
    """64-bit indexing: an input and an output of more than 2^31 float16 elements."""
    from roi_ops.testing import reference_roi_pool

    x = torch.randn(3, 1024, 768, 1024, dtype=torch.float16, device="cuda")  # 2.4e9 elements
    box = [1000.0, 700.0, 1023.0, 767.0]
    rois = torch.tensor([[2.0, *box], [0.0, *box]], device="cuda", dtype=torch.float16)
    with torch.no_grad():
        out, argmax = roi_ops.roi_pool_with_argmax(x, rois, 2, backend=backend)
    corner = x[2:, -3:].cpu()  # the last planes of image 2, past element 2^31
    expected, expected_argmax = reference_roi_pool(
        corner, torch.tensor([[0.0, *box]], dtype=torch.float16), 2
    )
    assert torch.equal(out[0, -3:].cpu(), expected[0])
    assert torch.equal(argmax[0, -3:].cpu(), expected_argmax[0])
    del x, out, argmax
    torch.cuda.empty_cache()
    many = 2**31 // (64 * 49) + 8  # K * C * PH * PW > 2^31 output elements
    x = torch.randn(2, 64, 8, 8, dtype=torch.float16, device="cuda")
    rois = torch.tensor([[1.0, 1, 2, 6, 7]], device="cuda", dtype=torch.float16).expand(many, 5)
    with torch.no_grad():
        out = roi_ops.roi_pool(x, rois, 7, backend=backend)
    expected, _ = reference_roi_pool(x.cpu(), rois[:1].cpu(), 7)
    assert torch.equal(out[-1:].cpu(), expected)
    assert torch.equal(out[many // 2 : many // 2 + 1].cpu(), expected)
