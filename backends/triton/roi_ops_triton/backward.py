"""The backward kernel: scatter grad_output at the argmax with atomic adds.

Atomics make the float sums' order, and so the last bits of the gradient, vary from run to run;
the backend declares ``deterministic_backward = False`` and roi_ops runs its shared deterministic
scatter instead under ``torch.use_deterministic_algorithms(True)``. A kernel that sums in
shared memory, as the CuPy backend's planes kernel does, needs shared-memory atomics, which
Triton does not expose.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .device import roi_image, widen


@triton.jit
def gradient_block(
    grad_out_ptr, arg_ptr, k, blk, C, PH, PW, s_k, s_c, s_h, s_w,
    ACC_F64: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Block blk of ROI k's grad_output elements, flat over (C, PH, PW): (channel, argmax,
    whether it adds anything, the gradient widened to the accumulation type) of each. `k` is
    int64; grad_output has any strides (zero strides included), argmax is contiguous."""
    phpw = PH * PW
    first = blk.to(tl.int64) * BLOCK
    c0 = first // phpw
    local = (first - c0 * phpw).to(tl.int32) + tl.arange(0, BLOCK)
    chan = c0 + local // phpw
    bins = local % phpw
    ph = bins // PW
    pw = bins - ph * PW
    ok = chan < C
    index = tl.load(arg_ptr + k * C * phpw + first + tl.arange(0, BLOCK), mask=ok, other=-1)
    hit = ok & (index >= 0)
    g_off = k * s_k + chan * s_c + ph.to(tl.int64) * s_h + pw.to(tl.int64) * s_w
    grad = widen(tl.load(grad_out_ptr + g_off, mask=hit, other=0.0), ACC_F64)
    return chan, index, hit, grad


@triton.jit(
    do_not_specialize=["N", "C", "HW", "PH", "PW", "s_k", "s_c", "s_h", "s_w", "blk_offset"]
)
def roi_pool_backward_scatter(
    grad_out_ptr,
    arg_ptr,
    rois_ptr,
    grad_in_ptr,
    N,
    C,
    HW,
    PH,
    PW,
    s_k,
    s_c,
    s_h,
    s_w,
    s_rk,
    blk_offset,
    ROIS_F64: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
):
    """Program (k, blk) adds grad_output[k] elements [blk * BLOCK, ...) (flat over C, PH, PW;
    any strides, zero strides included) into grad_input (dense (N, C, H, W), or (N, H, W, C)
    with CHANNELS_LAST) of image trunc(rois[k, 0]) at their argmax; -1 adds nothing. The image
    is read from the ROI in the kernel (clamped into [0, N): an invalid ROI's argmax is all -1).
    """
    k = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1) + blk_offset
    chan, index, hit, grad = gradient_block(
        grad_out_ptr, arg_ptr, k, blk, C, PH, PW, s_k, s_c, s_h, s_w, ACC_F64, BLOCK
    )
    batch = roi_image(rois_ptr, k, s_rk, N, ROIS_F64)
    if CHANNELS_LAST:  # grad_input is dense (N, H, W, C)
        dst = grad_in_ptr + (batch * HW + index) * C + chan
    else:
        dst = grad_in_ptr + (batch * C + chan) * HW + index
    tl.atomic_add(dst, grad, mask=hit, sem="relaxed")
