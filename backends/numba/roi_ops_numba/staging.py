"""The channels-last staging copy both forward kernels use for inputs whose channels are not
contiguous (NCHW and other strides). Importing this module imports numba."""

from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def _stage(src, plane0, s_c, s_h, s_w, nc, h0, h1, x0, x1, buf):
    """Copy rows h0..h1-1, columns x0..x1-1 of `nc` planes into `buf` channels-last.

    Element (c, h, w) is read from ``src[plane0 + c*s_c + h*s_h + w*s_w]`` and written to
    ``buf[((h - h0) * (x1 - x0) + (w - x0)) * nc + c]``. With a unit W stride the planes go 16 at
    a time, each pass over all rows, so the 16 planes are read as 16 long sequential streams and
    each pixel's 16 channels are written together (faster than rows outermost through 16 x 16
    transposing tiles; the README has the measurements). The other elements go one at a time.
    """
    region_w = x1 - x0
    c0 = 0
    if s_w == 1:
        while c0 + 16 <= nc:
            for h in range(h0, h1):
                d_row = (h - h0) * region_w * nc + c0
                s_row = plane0 + c0 * s_c + h * s_h + x0
                for w in range(region_w):
                    d = d_row + w * nc
                    for j in range(16):
                        buf[d + j] = src[s_row + w + j * s_c]
            c0 += 16
    for h in range(h0, h1):  # the channels left (all of them for other W strides)
        d_row = (h - h0) * region_w * nc
        s_row = plane0 + h * s_h + x0 * s_w
        for w in range(region_w):
            d = d_row + w * nc
            s = s_row + w * s_w
            for j in range(c0, nc):
                buf[d + j] = src[s + j * s_c]
