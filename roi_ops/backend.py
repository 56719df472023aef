"""The `Backend` base class that every roi_ops backend, first-party or third-party, subclasses,
and the two problem types a backend is handed: `RoIPoolProblem` (forward) and
`RoIPoolBackwardProblem` (backward).

A backend is a small declaration (name, priority, devices, dtypes, determinism, what it reports)
plus a few methods. Heavy imports (numba, Triton, CuPy) belong in a separate kernel module that
the backend imports lazily from `check_available` and `forward`, so that importing roi_ops stays
cheap. The core allocates every forward output; the backend fills it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

ALL_FLOAT_DTYPES: frozenset[torch.dtype] = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64}
)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of `dtype` are summed in: float32 for float16 and bfloat16 (rounded
    once to `dtype` at the end), the dtype itself otherwise."""
    return torch.float32 if dtype in _HALF_DTYPES else dtype


def batch_indices(rois: torch.Tensor, num_images: int) -> torch.Tensor:
    """(K,) int64 batch index of each ROI row, clamped into [0, N): ``trunc(rois[:, 0])`` for a
    valid row; some index in range for an invalid one (whose argmax is all -1). Two kernels."""
    return rois[:, 0].to(torch.int64).clamp_(0, max(num_images - 1, 0))


def device_type_of(tensor: torch.Tensor) -> str:
    """``tensor.device.type`` ("cpu", "cuda", "meta", ...).

    Cheaper than ``tensor.device.type`` for CPU and CUDA tensors, which are read through
    boolean properties: torch builds the device and then a new string on every ``.type``, a
    measurable part of a small call's host time when asked several times per call.
    """
    if tensor.is_cuda:
        return "cuda"
    if tensor.is_cpu:
        return "cpu"
    return tensor.device.type


class RoIPoolProblem:
    """One validated roi_pool forward call, as a backend sees it.

    Attributes:
        input: (N, C, H, W) float tensor, any strides (contiguous and channels_last are common).
        rois: (K, 5) tensor of rows (batch_index, x1, y1, x2, y2); dtype equal to ``input``'s, or
            float32 when ``input`` is float16/bfloat16. Same device as ``input``. Rows may be
            invalid (see docs/contract.md, "Bad input"): they must give zeros and argmax -1
            without any out-of-bounds access.
        pooled_height, pooled_width: output bins per ROI, each >= 1.
        spatial_scale: finite, > 0; maps ROI coordinates onto the feature map.
        needs_argmax: True when a gradient will be needed, so the argmax must be produced.
        bad_roi_log: None, or the int64 log of `roi_ops.bad_rois` in which a backend that
            declares ``reports_bad_rois`` records every invalid ROI (atomic minimum of the keys
            that module defines). Only such backends are given one. On CUDA it may live in
            pinned host memory mapped into the device's address space: use its ``data_ptr()``,
            not its ``.device``.
    """

    __slots__ = (
        "input",
        "rois",
        "pooled_height",
        "pooled_width",
        "spatial_scale",
        "needs_argmax",
        "bad_roi_log",
    )

    def __init__(
        self,
        input: torch.Tensor,
        rois: torch.Tensor,
        pooled_height: int,
        pooled_width: int,
        spatial_scale: float,
        needs_argmax: bool,
        bad_roi_log: torch.Tensor | None = None,
    ) -> None:
        self.input = input
        self.rois = rois
        self.pooled_height = pooled_height
        self.pooled_width = pooled_width
        self.spatial_scale = spatial_scale
        self.needs_argmax = needs_argmax
        self.bad_roi_log = bad_roi_log

    @property
    def device(self) -> torch.device:
        return self.input.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input.dtype

    @property
    def num_rois(self) -> int:
        return self.rois.shape[0]

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        _, channels, _, _ = self.input.shape
        return (self.rois.shape[0], channels, self.pooled_height, self.pooled_width)

    def __repr__(self) -> str:
        dtype = str(self.input.dtype).removeprefix("torch.")
        return (
            f"RoIPoolProblem(input={tuple(self.input.shape)} {dtype} on {self.input.device}, "
            f"rois={tuple(self.rois.shape)}, output=({self.pooled_height}, "
            f"{self.pooled_width}), spatial_scale={self.spatial_scale}, "
            f"needs_argmax={self.needs_argmax})"
        )


class _BackwardProblem:
    """What the one-map and the multi-level backward problems share: the incoming gradient, the
    forward's argmax and ROIs, the dtype of the gradients to return, determinism, and the batch
    index of each ROI, computed on first use."""

    __slots__ = ("grad_output", "argmax", "rois", "input_dtype", "deterministic", "_batch_index")

    def __init__(
        self,
        grad_output: torch.Tensor,
        argmax: torch.Tensor,
        rois: torch.Tensor,
        input_dtype: torch.dtype,
        deterministic: bool,
    ) -> None:
        self.grad_output = grad_output
        self.argmax = argmax
        self.rois = rois
        self.input_dtype = input_dtype
        self.deterministic = deterministic
        self._batch_index: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.grad_output.device

    @property
    def num_images(self) -> int:
        """N, the images of the forward's input (every level has the same)."""
        raise NotImplementedError

    @property
    def batch_index(self) -> torch.Tensor:
        """(K,) int64 batch index of each ROI, clamped into [0, N), computed on first use (two
        small kernels; a backend that reads ``rois`` in its own kernel never pays them).

        Valid ROIs get ``trunc(rois[:, 0])``; invalid ones (whose argmax is all -1) get some
        index in [0, N).
        """
        if self._batch_index is None:
            self._batch_index = batch_indices(self.rois, self.num_images)
        return self._batch_index


class RoIPoolBackwardProblem(_BackwardProblem):
    """One roi_pool backward call, as a backend sees it.

    Attributes:
        grad_output: (K, C, PH, PW) of ``input_dtype``, any strides (zero strides included).
        argmax: contiguous (K, C, PH, PW) int32 from the forward; -1 means no gradient.
        rois: the forward's (K, 5) rois (the batch index of row k is ``trunc(rois[k, 0])``).
        input_shape: (N, C, H, W) of the forward's input.
        input_dtype: dtype of the gradient to return.
        memory_format: the layout wanted: ``torch.contiguous_format``, or
            ``torch.channels_last`` for a channels_last input when the backend lists it in
            ``gradient_formats``. A backend may still return a contiguous gradient where that
            is faster (roi_ops then copies it into channels_last, as autograd would).
        deterministic: True under ``torch.use_deterministic_algorithms(True)``; roi_ops only
            calls the backward of a backend that declares ``deterministic_backward`` then.
    """

    __slots__ = ("input_shape", "memory_format")

    def __init__(
        self,
        grad_output: torch.Tensor,
        argmax: torch.Tensor,
        rois: torch.Tensor,
        input_shape: tuple[int, int, int, int],
        input_dtype: torch.dtype,
        memory_format: torch.memory_format = torch.contiguous_format,
        deterministic: bool = False,
    ) -> None:
        super().__init__(grad_output, argmax, rois, input_dtype, deterministic)
        self.input_shape = tuple(input_shape)
        self.memory_format = memory_format

    @property
    def num_images(self) -> int:
        return self.input_shape[0]

    @property
    def accumulate_dtype(self) -> torch.dtype:
        """float32 for float16/bfloat16 gradients, else ``input_dtype`` (see `accumulate_dtype`)."""
        return accumulate_dtype(self.input_dtype)

    def __repr__(self) -> str:
        dtype = str(self.input_dtype).removeprefix("torch.")
        return (
            f"RoIPoolBackwardProblem(grad_output={tuple(self.grad_output.shape)} on "
            f"{self.grad_output.device}, input_shape={self.input_shape} {dtype}, "
            f"memory_format={self.memory_format}, deterministic={self.deterministic})"
        )


class MultiScaleRoIPoolProblem:
    """One validated multi-level (FPN) roi_pool call, as a backend sees it.

    Attributes:
        features: the L levels, finest first: (N, C, H_l, W_l) tensors of one dtype and device,
            any strides.
        rois: (K, 5) rows (batch_index, x1, y1, x2, y2), as for `RoIPoolProblem`.
        levels: (K,) int64 level of each ROI in [0, L), or -1 for a ROI that belongs to no
            level (its level is not a number: a box inverted along one axis, non-finite
            coordinates); such rows give zeros and argmax -1. Computed by roi_ops
            (`roi_ops.levels.roi_levels`), on the device, exactly as torchvision's LevelMapper.
        pooled_height, pooled_width: output bins per ROI, each >= 1.
        spatial_scales: the L scales, one per level.
        needs_argmax: whether the argmax must be produced.
        bad_roi_log: as for `RoIPoolProblem`.

    Row k of the output is ``roi_pool(features[levels[k]], rois[k:k+1], (PH, PW),
    spatial_scales[levels[k]])``; its argmax indexes the plane of that level.
    """

    __slots__ = (
        "features",
        "rois",
        "levels",
        "pooled_height",
        "pooled_width",
        "spatial_scales",
        "needs_argmax",
        "bad_roi_log",
    )

    def __init__(
        self,
        features: tuple[torch.Tensor, ...],
        rois: torch.Tensor,
        levels: torch.Tensor,
        pooled_height: int,
        pooled_width: int,
        spatial_scales: tuple[float, ...],
        needs_argmax: bool,
        bad_roi_log: torch.Tensor | None = None,
    ) -> None:
        self.features = tuple(features)
        self.rois = rois
        self.levels = levels
        self.pooled_height = pooled_height
        self.pooled_width = pooled_width
        self.spatial_scales = tuple(spatial_scales)
        self.needs_argmax = needs_argmax
        self.bad_roi_log = bad_roi_log

    @property
    def device(self) -> torch.device:
        return self.features[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.features[0].dtype

    @property
    def num_levels(self) -> int:
        return len(self.features)

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        channels = self.features[0].shape[1]
        return (self.rois.shape[0], channels, self.pooled_height, self.pooled_width)

    def level(self, index: int) -> RoIPoolProblem:
        """The single-level problem of level `index` over every ROI (for planning)."""
        return RoIPoolProblem(
            self.features[index],
            self.rois,
            self.pooled_height,
            self.pooled_width,
            self.spatial_scales[index],
            self.needs_argmax,
        )


class MultiScaleRoIPoolBackwardProblem(_BackwardProblem):
    """One multi-level roi_pool backward call, as a backend sees it.

    Attributes:
        grad_output: (K, C, PH, PW) of ``input_dtype``, any strides.
        argmax: contiguous (K, C, PH, PW) int32 from the forward (index into the ROI's level).
        rois, levels: the forward's.
        input_shapes: the L (N, C, H_l, W_l) shapes.
        input_dtype: dtype of the gradients to return.
        memory_formats: the layout wanted for each level's gradient (as for
            `RoIPoolBackwardProblem.memory_format`).
        deterministic: True under ``torch.use_deterministic_algorithms(True)``.
    """

    __slots__ = ("levels", "input_shapes", "memory_formats")

    def __init__(
        self,
        grad_output: torch.Tensor,
        argmax: torch.Tensor,
        rois: torch.Tensor,
        levels: torch.Tensor,
        input_shapes: tuple[tuple[int, int, int, int], ...],
        input_dtype: torch.dtype,
        memory_formats: tuple[torch.memory_format, ...],
        deterministic: bool = False,
    ) -> None:
        super().__init__(grad_output, argmax, rois, input_dtype, deterministic)
        self.levels = levels
        self.input_shapes = tuple(tuple(s) for s in input_shapes)
        self.memory_formats = tuple(memory_formats)

    @property
    def num_images(self) -> int:
        return self.input_shapes[0][0]


class Backend:
    """Base class for roi_pool backends.

    Subclasses set the class attributes and implement `forward`; they may override
    `check_available`, `not_supported_reasons` and `backward`. Register a backend through the
    ``roi_ops.backends`` entry-point group (``name = "module:Class"``) or, in-process, with
    `roi_ops.register_backend`.

    Class attributes:
        name: the name users pass as ``backend=``; must match the entry-point name.
        priority: higher wins when ``backend="auto"`` chooses among usable backends.
        device_types: torch device types it runs on (``"cpu"``, ``"cuda"``, ...); ``"*"`` = any.
        dtypes: input dtypes it supports.
        deterministic: whether its forward gives run-to-run identical results. Under
            ``torch.use_deterministic_algorithms(True)`` a backend that does not is not chosen.
        deterministic_backward: whether its `backward` gives run-to-run identical gradients.
            Under ``torch.use_deterministic_algorithms(True)`` the backward of a backend that
            does not is replaced by roi_ops' shared deterministic scatter (`roi_ops.explain`
            says so).
        reports_bad_rois: whether `forward` records invalid ROIs in ``problem.bad_roi_log``
            (see `roi_ops.bad_rois`). roi_ops then finds bad ROIs without reading them on the
            host, so a CUDA call never waits for the device. Otherwise roi_ops checks the ROIs
            itself: a few extra launches on CUDA, still without waiting.
        description: one line for `roi_ops.list_backends()` and ``python -m roi_ops info``.
        gradient_formats: memory formats `backward` can return grad_input in. roi_ops asks for
            ``torch.channels_last`` (for a channels_last input) only from a backend that lists
            it; whatever layout comes back, roi_ops copies it into the input's when it differs.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu"})
    dtypes: ClassVar[frozenset[torch.dtype]] = ALL_FLOAT_DTYPES
    deterministic: ClassVar[bool] = True
    deterministic_backward: ClassVar[bool] = True
    reports_bad_rois: ClassVar[bool] = False
    description: ClassVar[str] = ""
    gradient_formats: ClassVar[frozenset[torch.memory_format]] = frozenset(
        {torch.contiguous_format}
    )

    def check_available(self) -> str | None:
        """Return why this backend cannot run in this process at all, or None if it can.

        Called once and cached. Import heavy dependencies here (lazily), never at module import.
        """
        return None

    def not_supported_reasons(self, problem: RoIPoolProblem) -> list[str]:
        """Return the reasons this backend cannot run `problem`; an empty list means usable.

        The default checks the device type and dtype against the class attributes. Overrides
        should extend ``super().not_supported_reasons(problem)``. Called on every call that
        considers this backend: keep it cheap, and never read tensor values (that would
        synchronise a CUDA device).
        """
        reasons = []
        device_type = device_type_of(problem.input)
        if "*" not in self.device_types and device_type not in self.device_types:
            supported = ", ".join(sorted(self.device_types))
            reasons.append(f"device type {device_type!r} not supported (supports: {supported})")
        if problem.input.dtype not in self.dtypes:
            supported = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            dtype_name = str(problem.input.dtype).removeprefix("torch.")
            reasons.append(f"dtype {dtype_name} not supported (supports: {supported})")
        return reasons

    def forward(
        self, problem: RoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Compute roi_pool for `problem`, writing every element of `output` (and `argmax`).

        Args:
            problem: the validated call.
            output: contiguous (K, C, PH, PW) tensor of the input's dtype, uninitialised (tests
                poison it): every element must be written.
            argmax: contiguous (K, C, PH, PW) int32 tensor to fill with ``h * W + w`` (-1 for an
                empty bin or an invalid ROI), or None when ``problem.needs_argmax`` is False.

        Must launch on ``problem.device`` and, on CUDA, on torch's current stream, without
        synchronising the device. A backend that declares ``reports_bad_rois`` also records
        invalid ROIs in ``problem.bad_roi_log`` when it is not None.
        """
        raise NotImplementedError

    def backward(self, problem: RoIPoolBackwardProblem) -> torch.Tensor | None:
        """Return grad_input, or None to use roi_ops' shared deterministic scatter.

        The result is an (N, C, H, W) tensor of ``problem.input_dtype`` on the gradient's
        device (float16/bfloat16 summed in float32 and rounded once), preferably dense in
        ``problem.memory_format``. It must equal, up to the order of the float sums,
        ``grad_input[b_k, c].flat[argmax] += grad_output`` over every argmax other than -1.
        """
        return None

    def multi_scale_not_supported_reasons(self, problem: MultiScaleRoIPoolProblem) -> list[str]:
        """Why this backend has no fused kernel for multi-level `problem` (empty: it has one).

        The default says it has none: roi_ops then pools each level through this backend's
        `forward` and `backward`. A backend with fused kernels overrides this and
        `forward_multi_scale` (and may override `backward_multi_scale`).
        """
        return ["no fused multi-level kernel (roi_ops pools level by level through it)"]

    def forward_multi_scale(
        self, problem: MultiScaleRoIPoolProblem, output: torch.Tensor, argmax: torch.Tensor | None
    ) -> None:
        """Fill `output` (K, C, PH, PW) and, unless None, the int32 `argmax` for every ROI of
        every level in one pass (see `MultiScaleRoIPoolProblem`); on CUDA without waiting."""
        raise NotImplementedError

    def backward_multi_scale(
        self, problem: MultiScaleRoIPoolBackwardProblem
    ) -> list[torch.Tensor] | None:
        """The L gradients of a fused forward, or None for roi_ops' shared deterministic
        scatter (one per level). Each is (N, C, H_l, W_l) of ``problem.input_dtype``."""
        return None
