"""GPU only: compiled kernels are not recompiled as shapes change, cached launches give the
bits that Triton's own binding gives, and offsets pass 2^31."""

from __future__ import annotations

import pytest
import torch

from roi_ops.testing import assert_same_bits, reference_roi_pool

pytest.importorskip("triton")

from triton_cases import (  # noqa: E402
    COMPILED,
    DTYPES,
    check,
    rois_dtype,
    run_forward,
)

from roi_ops_triton import forward, launch_cache  # noqa: E402

pytestmark = [pytest.mark.gpu, COMPILED]


def _compiled_variants() -> int | None:
    # Triton 3.x: device_caches[device] = (kernel_cache, ...); other layouts skip the test.
    total = 0
    for kernel in (forward.roi_pool_forward_unit, forward.roi_pool_forward_channels_last):
        caches = getattr(kernel, "device_caches", None)
        if caches is None:
            return None
        try:
            total += sum(len(entry[0]) for entry in caches.values())
        except (TypeError, IndexError, AttributeError):
            return None
    return total


def test_no_recompilation_when_shapes_change():
    g = torch.Generator().manual_seed(0)

    def call(n, h, w, k, channels_last):
        x = torch.randn(n, 16, h, w, generator=g).cuda()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        rois = torch.cat([torch.randint(0, n, (k, 1)), torch.rand(k, 4) * 40], 1).cuda()
        run_forward(x, rois, (7, 7), 1 / 4)

    for channels_last in (False, True):
        call(2, 30, 40, 5, channels_last)
    before = _compiled_variants()
    if before is None:
        pytest.skip("this Triton version does not expose its kernel cache")
    for n, h, w, k in ((1, 31, 41, 1), (3, 32, 47, 16), (5, 17, 33, 300), (2, 48, 48, 4097)):
        for channels_last in (False, True):
            call(n, h, w, k, channels_last)
    assert _compiled_variants() == before


def test_cached_launches_match_the_reference_and_triton_binding():
    """Launches straight to a cached compiled kernel on calls whose dtypes, layouts, pointer
    alignments and shapes change from one to the next, each against the reference; the same
    calls bound by Triton (an empty cache) give the same bits."""
    launch_cache.clear()
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
                          * 24], 1).to(rois_dtype(dtype)).cuda()  # fmt: skip
        calls.append((x, rois))
    for x, rois in calls * 2:  # the second pass repeats every key
        check(x, rois, (3, 4), 0.5)
    direct = [entry for entry in launch_cache._compiled.values() if entry is not None]
    assert direct, "no launch went straight to a compiled kernel"
    for x, rois in calls[:8]:
        launch_cache.clear()
        bound, bound_argmax = run_forward(x, rois, (3, 4), 0.5)
        cached, cached_argmax = run_forward(x, rois, (3, 4), 0.5)
        assert_same_bits(cached, bound.cpu())
        assert torch.equal(cached_argmax, bound_argmax)


@pytest.mark.slow
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
