"""Repeat launches of a compiled Triton kernel without `JITFunction.run`'s per-call binding.

``kernel[grid](*args, **meta)`` binds every argument, computes Triton's specialisation key and
looks the compiled kernel up on each call. `launch` does that once per *launch key* and then
starts the `CompiledKernel` it returned directly (its ``[grid]`` runner, Triton's own API for
launching a compiled kernel). On the H100 machine's host (Triton 3.6) this saves about 14 us
per launch: a tiny roi_pool inference call took 137 us of host time instead of 151 (medians of
15 interleaved samples, ``python scripts/triton_launch_ab.py``).

The launch key is at least as fine as Triton's specialisation: every tensor's dtype and 16-byte
alignment, every int's width class (int32, int64), whether it is 1 and whether it is a multiple
of 16 (Triton may specialise on each), every bool's value, and the constexpr and option values
in ``meta``. Two calls with equal keys therefore get the same compiled kernel from Triton, and
the cached one is that kernel. Arguments of any other type, an interpreted kernel
(``TRITON_INTERPRET=1``) and a compiled kernel without the ``[grid]`` runner go through
``kernel[grid]`` every time. ``ROI_OPS_TRITON_FAST_LAUNCH=0`` (read at import) turns the cache
off.
"""

from __future__ import annotations

from typing import Any

import torch

from roi_ops.config import env_flag

FAST_LAUNCH_ENV = "ROI_OPS_TRITON_FAST_LAUNCH"
enabled = env_flag(FAST_LAUNCH_ENV)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


class _NotKeyable(Exception):
    pass


def _argument_key(value: Any, _tensor: type = torch.Tensor) -> object:
    kind = type(value)
    if kind is int:  # the common case first, as one small int
        return (value & 15 == 0) + 2 * (value == 1) + 4 * (_INT32_MIN <= value <= _INT32_MAX)
    if kind is _tensor or isinstance(value, _tensor):
        return value.dtype, value.data_ptr() & 15 == 0
    if kind is bool:
        return "bool", value  # apart from the ints' keys
    if kind is float:
        return float
    raise _NotKeyable


# (kernel, device index, meta items, argument keys) -> (compiled kernel, names of the kernel
# parameters passed in meta, in signature order); None: always launch through kernel[grid].
_compiled: dict[tuple, tuple[Any, tuple[str, ...]] | None] = {}
_MAX_CACHED = 512


def launch(
    kernel: Any, grid: tuple[int, int], args: tuple, meta: dict[str, Any], device_index: int
) -> None:
    """Launch Triton `kernel` on `grid` (two axes) with positional `args` and keyword `meta`
    (constexpr parameters, then options such as ``num_warps``), on the current device and its
    current torch stream, as ``kernel[grid](*args, **meta)`` does.

    `device_index` is the CUDA device the launch runs on (the current device; -1 for CPU tensors
    under the interpreter). Raises what Triton raises.
    """
    if not enabled:
        kernel[grid](*args, **meta)
        return
    try:
        key = (kernel, device_index, tuple(meta.items()), tuple(map(_argument_key, args)))
    except _NotKeyable:
        kernel[grid](*args, **meta)
        return
    entry = _compiled.get(key, _compiled)
    if entry is _compiled:  # first launch with this key: through Triton, which compiles it
        compiled = kernel[grid](*args, **meta)
        if len(_compiled) >= _MAX_CACHED:
            _compiled.clear()
        _compiled[key] = _runner_entry(kernel, compiled, len(args), meta)
        return
    if entry is None:
        kernel[grid](*args, **meta)
        return
    compiled, meta_parameters = entry
    # The runner takes every kernel parameter in signature order, constexprs included.
    compiled[(grid[0], grid[1], 1)](*args, *[meta[name] for name in meta_parameters])


def _runner_entry(kernel: Any, compiled: Any, positional: int, meta: dict[str, Any]):
    """(compiled, the meta names that are kernel parameters) when `compiled` can be launched
    directly with all of `kernel`'s parameters; None otherwise."""
    names = getattr(kernel, "arg_names", None)
    if names is None or not hasattr(type(compiled), "__getitem__"):
        return None
    rest = tuple(names[positional:])
    if not all(name in meta for name in rest):  # a parameter left to its default
        return None
    return compiled, rest


def clear() -> None:
    """Forget every cached compiled kernel (tests; the next launch of each key binds again)."""
    _compiled.clear()
