"""Contract-relevant inputs: named hand-picked cases and exact comparison against the reference."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import poisoned_outputs, value_checks
from ..functional import roi_pool, roi_pool_with_argmax
from ..layout import gradient_memory_format
from ..validation import FLOAT_DTYPES
from .reference import reference_roi_pool, reference_roi_pool_backward

# How many calls `check_case` compared against the reference, per backend (for test reports).
COMPARISONS: Counter[str] = Counter()


@dataclass
class RoiPoolCase:
    """One roi_pool call to check.

    Attributes:
        name: what the case exercises.
        input: (N, C, H, W) features (never all zeros).
        rois: (K, 5) tensor or a list of (L, 4) tensors.
        output_size: int or (PH, PW).
        spatial_scale: the coordinate scale.
        needs_unchecked: True when rows are invalid, so value checks must be off.
    """

    name: str
    input: torch.Tensor
    rois: torch.Tensor | list[torch.Tensor]
    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    needs_unchecked: bool = False
    tags: tuple[str, ...] = field(default=())

    def rois_tensor(self) -> torch.Tensor:
        """The rois as (K, 5) rows."""
        if isinstance(self.rois, torch.Tensor):
            return self.rois
        rows = [
            torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], dim=1)
            for i, b in enumerate(self.rois)
        ]
        if not rows:
            return self.input.new_empty((0, 5))
        return torch.cat(rows)

    def __repr__(self) -> str:
        dtype = str(self.input.dtype).removeprefix("torch.")
        return f"RoiPoolCase({self.name}, {dtype}, input {tuple(self.input.shape)})"


def rois_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """A rois dtype to pair with inputs of `dtype` (float32 for bfloat16, like autocast)."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


# Five NaNs of each dtype, positive and negative, with and without payload bits (16-bit and
# float32 ones quiet: widening quiets a signalling NaN, and hardware need not agree on how).
_NAN_BITS = {
    torch.float16: (torch.int16, [0x7E00, -0x0200, 0x7F23, -0x00FF, 0x7E01]),
    torch.bfloat16: (torch.int16, [0x7FC0, -0x0040, 0x7FE3, -0x001D, 0x7FC1]),
    torch.float32: (torch.int32, [0x7FC00000, -0x00400000, 0x7FC12345, -0x003EDCBB, 0x7FFFFFFF]),
    torch.float64: (
        torch.int64,
        [0x7FF8000000000000, -0x0008000000000000, 0x7FF8123456789ABC, -1, 0x7FF0000000000001],
    ),
}


def nans_with_payloads(dtype: torch.dtype) -> torch.Tensor:
    """(5,) NaNs of `dtype` with distinct bits: signs, payloads, quiet (and, in float64, one
    signalling). The bad-ROI log keeps a row's float64 bits, so a backend must widen each as
    torch's ``.to(torch.float64)`` does; torch's float16 -> float32 on the CPU does not (its
    result depends on the element's place in the tensor)."""
    bits_dtype, words = _NAN_BITS[dtype]
    return torch.tensor(words, dtype=bits_dtype).view(dtype)


# Every (input dtype, rois dtype) pair the contract accepts: rois of the input's dtype, or float32
# rois with half-precision inputs.
DTYPE_PAIRS: tuple[tuple[torch.dtype, torch.dtype], ...] = tuple(
    (dtype, dtype) for dtype in FLOAT_DTYPES
) + ((torch.float16, torch.float32), (torch.bfloat16, torch.float32))


def dtype_id(value: torch.dtype | Sequence[torch.dtype]) -> str:
    """A short test id for a dtype or a tuple of dtypes: ``"float16"``, ``"float16-float32"``.

    For ``pytest.mark.parametrize(..., ids=dtype_id)``, e.g. over `DTYPE_PAIRS`.
    """
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return "-".join(dtype_id(dtype) for dtype in value)


def tie_heavy_features(shape: Sequence[int], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Features that exercise the ordering rules: small integers in [-2, 1] (ties everywhere),
    zeros of either sign, and about 1% NaN and 1% -inf.

    Args:
        shape: the (N, C, H, W) shape (any shape works).
        seed: seeds a private generator (the result is deterministic).
        dtype: the result's dtype (every value is exact in all four float dtypes).

    Returns:
        A contiguous CPU tensor of `shape` and `dtype`.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 2, shape, generator=g).to(torch.float64)
    signs = torch.rand(shape, generator=g) < 0.5
    x = torch.where((x == 0) & signs, torch.tensor(-0.0, dtype=torch.float64), x)
    special = torch.rand(shape, generator=g)
    x[special < 0.01] = math.nan
    x[special > 0.99] = -math.inf
    return x.to(dtype)


def _features(shape, dtype, device, generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 0.5
    return values.to(dtype).to(device)


def _boxes(count, width, height, scale, generator, margin=0.25) -> torch.Tensor:
    """(count, 4) random image-pixel boxes, partly off-map."""
    size = torch.tensor([width, height, width, height], dtype=torch.float64) / scale
    corners = (
        torch.rand(count, 4, generator=generator, dtype=torch.float64) * (1 + 2 * margin) - margin
    ) * size
    low = torch.minimum(corners[:, :2], corners[:, 2:])
    high = torch.maximum(corners[:, :2], corners[:, 2:])
    return torch.cat([low, high], dim=1)


def _rows(batch, boxes, dtype, device) -> torch.Tensor:
    batch = torch.as_tensor(batch, dtype=torch.float64).reshape(-1, 1)
    return torch.cat([batch, boxes], dim=1).to(dtype).to(device)


def contract_cases(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    rois_dtype: torch.dtype | None = None,
) -> list[RoiPoolCase]:
    """Hand-picked cases covering every trap in the contract, for one device and dtype.

    `rois_dtype` defaults to `rois_dtype_for(dtype)`; float32 is also allowed for half inputs.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    rdt = rois_dtype or rois_dtype_for(dtype)
    cases = []

    x = _features((2, 3, 9, 11), dtype, device, g)
    boxes = _boxes(12, 11, 9, 1 / 16, g)
    batch = torch.randint(0, 2, (12,), generator=g)
    cases.append(RoiPoolCase("random-scale-1/16", x, _rows(batch, boxes, rdt, device), 3, 1 / 16))

    x = _features((2, 4, 12, 10), dtype, device, g)
    boxes = _boxes(10, 10, 12, 0.5, g)
    cases.append(
        RoiPoolCase(
            "non-square-output", x, _rows(torch.arange(10) % 2, boxes, rdt, device), (3, 5), 0.5
        )
    )

    # Coordinates whose scaled value ends in exactly .5, positive and negative.
    x = _features((1, 2, 10, 10), dtype, device, g)
    halves = torch.tensor(
        [
            [1.0, 1.0, 5.0, 7.0],
            [-3.0, -1.0, 3.0, 5.0],
            [3.0, 5.0, 9.0, 11.0],
            [-5.0, -5.0, -1.0, 1.0],
            [0.0, 1.0, 15.0, 13.0],
        ],
        dtype=torch.float64,
    )
    cases.append(RoiPoolCase("half-rounding", x, _rows([0] * 5, halves, rdt, device), 2, 0.5))

    # Off-map (partly and wholly) and malformed (inverted) boxes.
    x = _features((2, 2, 8, 8), dtype, device, g)
    odd = torch.tensor(
        [
            [-20.0, -20.0, -2.0, -3.0],
            [6.0, 6.0, 30.0, 30.0],
            [40.0, 1.0, 60.0, 5.0],
            [5.0, 6.0, 1.0, 2.0],
            [3.0, 3.0, 3.0, 3.0],
            [-4.0, 2.0, 12.0, 5.0],
        ],
        dtype=torch.float64,
    )
    cases.append(
        RoiPoolCase(
            "off-map-and-malformed", x, _rows([0, 1, 0, 1, 0, 1], odd, rdt, device), (3, 2), 1.0
        )
    )

    # Ties: small integer values repeat inside every bin.
    ties = torch.randint(-2, 3, (2, 3, 9, 9), generator=g).to(dtype).to(device)
    boxes = _boxes(8, 9, 9, 1.0, g, margin=0.0)
    cases.append(RoiPoolCase("ties", ties, _rows(torch.arange(8) % 2, boxes, rdt, device), 3))

    # NaN is maximal (first wins); -inf is ordinary (a bin of -inf gives -inf).
    x = _features((1, 3, 8, 8), dtype, device, g)
    x[0, 0, 2, 3] = float("nan")
    x[0, 0, 2, 1] = float("nan")
    x[0, 0, 5, 5] = float("inf")
    x[0, 1] = float("-inf")
    x[0, 2, :4, :4] = float("-inf")
    x[0, 2, 6, 6] = float("nan")
    whole = torch.tensor(
        [[0.0, 0.0, 7.0, 7.0], [1.0, 1.0, 4.0, 4.0], [0.0, 2.0, 7.0, 2.0]], dtype=torch.float64
    )
    cases.append(RoiPoolCase("nan-and-inf", x, _rows([0, 0, 0], whole, rdt, device), 2))

    # Float bin edges: in float32, roi height 57 with PH 7 gives a longer last bin.
    x = _features((1, 2, 64, 6), dtype, device, g)
    tall = torch.tensor(
        [[0.0, 0.0, 5.0, 56.0], [0.0, 3.0, 4.0, 59.0], [1.0, 0.0, 2.0, 63.0]], dtype=torch.float64
    )
    cases.append(RoiPoolCase("float-edges", x, _rows([0, 0, 0], tall, rdt, device), (7, 2)))

    # A list of per-image boxes, with an empty entry.
    x = _features((3, 2, 7, 9), dtype, device, g)
    per_image = [
        _boxes(3, 9, 7, 0.5, g).to(rdt).to(device),
        torch.empty(0, 4, dtype=rdt, device=device),
        _boxes(2, 9, 7, 0.5, g).to(rdt).to(device),
    ]
    cases.append(RoiPoolCase("list-rois", x, per_image, 2, 0.5))

    cases.append(
        RoiPoolCase(
            "no-rois",
            _features((2, 3, 5, 5), dtype, device, g),
            torch.empty(0, 5, dtype=rdt, device=device),
            4,
        )
    )

    # Invalid rows give zeros and argmax -1 when checks are off; huge coordinates saturate.
    x = _features((2, 2, 6, 7), dtype, device, g)
    big = 6e4 if rdt == torch.float16 else 1e30
    bad = torch.tensor(
        [
            [2.0, 0, 0, 3, 3],
            [-1.0, 0, 0, 3, 3],
            [0.0, math.nan, 0, 3, 3],
            [1.0, 0, 0, math.inf, 3],
            [math.nan, 0, 0, 3, 3],
            [1.7, 1, 1, 4, 4],
            [-0.5, 0, 0, 2, 2],
            [0.0, -big, -big, big, big],
            [1.0, -big, 2.0, 3.0, big],
            [0.0, 1, 1, 5, 5],
        ],
        dtype=torch.float64,
    )
    cases.append(
        RoiPoolCase(
            "invalid-and-huge", x, bad.to(rdt).to(device), (2, 3), 1.0, needs_unchecked=True
        )
    )
    return cases


OUTPUT_AXES = ("k", "c", "ph", "pw")
INPUT_AXES = ("n", "c", "h", "w")


def first_difference(
    actual: torch.Tensor,
    expected: torch.Tensor,
    axes: tuple[str, ...] = OUTPUT_AXES,
    bitwise: bool = True,
) -> str | None:
    """Where `actual` first differs from `expected`, in words: the element's indices (named by
    `axes` when they fit), both values and how many elements differ; None if they are equal.

    Floats compare bit for bit when `bitwise` (so -0.0 differs from 0.0), by value otherwise;
    any NaN equals any NaN. `expected` may live on another device.
    """
    expected = expected.to(actual.device)
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    if actual.is_floating_point():
        both_nan = actual.isnan() & expected.isnan()
        if bitwise:
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
            same = actual.contiguous().view(bits) == expected.contiguous().view(bits)
        else:
            same = actual == expected
        same = same | both_nan
    else:
        same = actual == expected
    if bool(same.all()):
        return None
    wrong = (~same).nonzero()
    index = tuple(wrong[0].tolist())
    if len(axes) == len(index):
        where = "[" + ", ".join(f"{a}={i}" for a, i in zip(axes, index, strict=True)) + "]"
    else:
        where = str(list(index))
    return (
        f"first difference at {where}: got {actual[index].item()!r}, expected "
        f"{expected[index].item()!r} ({wrong.shape[0]} of {actual.numel()} elements differ)"
    )


def _assert_same_values(
    actual: torch.Tensor, expected: torch.Tensor, what: str, **options: object
) -> None:
    difference = first_difference(actual, expected, **options)
    if difference is not None:
        raise AssertionError(f"{what} differs from the reference: {difference}")


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, what: str = "output") -> None:
    """Assert `actual` equals `expected` bit for bit: same dtype and shape, -0.0 differs from
    0.0, and NaN must stand where the reference has NaN (its payload may differ).

    `expected` may live on another device; the message says where they first differ (see
    `first_difference`).
    """
    _assert_same_values(actual, expected, what)


def check_case(case: RoiPoolCase, backend: str, check_backward: bool = True) -> None:
    """Assert `backend` matches the reference on `case`: output bits, argmax, and gradient.

    Outputs are poisoned before the backend runs. The gradient uses small-integer grad_output
    values, so any summation order is exact and the comparison is exact too.
    """
    COMPARISONS[backend] += 1
    rois = case.rois_tensor()
    expected, expected_argmax = reference_roi_pool(
        case.input, rois, case.output_size, case.spatial_scale
    )
    with poisoned_outputs(), value_checks(not case.needs_unchecked):
        output, argmax = roi_pool_with_argmax(
            case.input, case.rois, case.output_size, case.spatial_scale, backend=backend
        )
        _assert_same_values(output, expected, f"{backend}: {case!r} output")
        _assert_same_values(argmax.cpu(), expected_argmax, f"{backend}: {case!r} argmax")
        inference = roi_pool(
            case.input, case.rois, case.output_size, case.spatial_scale, backend=backend
        )
        _assert_same_values(inference, expected, f"{backend}: {case!r} inference output")
        if not check_backward:
            return
        leaf = case.input.detach().clone().requires_grad_(True)
        pooled = roi_pool(leaf, case.rois, case.output_size, case.spatial_scale, backend=backend)
        _assert_same_values(pooled.detach(), expected, f"{backend}: {case!r} training output")
    g = torch.Generator().manual_seed(1)
    grad_output = torch.randint(1, 5, pooled.shape, generator=g).to(pooled.dtype)
    pooled.backward(grad_output.to(pooled.device))
    expected_grad = reference_roi_pool_backward(
        grad_output, expected_argmax, rois, tuple(case.input.shape)
    )
    # The contract accumulates exactly (float32 for half types) and rounds once to the dtype.
    expected_grad = expected_grad.to(case.input.dtype)
    _assert_same_values(
        leaf.grad.cpu(),
        expected_grad,
        f"{backend}: {case!r} gradient (input.grad)",
        axes=INPUT_AXES,
        bitwise=False,
    )
    memory_format = gradient_memory_format(leaf)
    if not leaf.grad.is_contiguous(memory_format=memory_format):
        raise AssertionError(
            f"{case!r}: gradient strides {leaf.grad.stride()} are not {memory_format} (the "
            f"input's strides are {leaf.stride()})"
        )
