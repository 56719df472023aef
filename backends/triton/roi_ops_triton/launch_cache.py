"""Repeat launches of a compiled Triton kernel without `JITFunction.run`'s per-call binding.

``kernel[grid](*args, **meta)`` binds every argument, computes Triton's specialisation key and
looks the compiled kernel up on each call. `launch` does that once per *launch key* and then
starts the `CompiledKernel` it returned directly, through its ``[grid]`` runner (Triton's own
API for launching a compiled kernel), on the current device and its current torch stream.

The caller's key must determine everything Triton specialises the launch on: the kernel, the
device, every constexpr and option in ``meta``, each tensor argument's dtype and 16-byte
alignment, and each integer argument's class (int32 or int64; for integers Triton specialises,
also whether it is 1 and whether it is a multiple of 16). Two launches with equal keys then get
the same compiled kernel from Triton, and the cached one is that kernel. An interpreted kernel
(``TRITON_INTERPRET=1``), and a compiled kernel without the ``[grid]`` runner, go through
``kernel[grid]`` every time.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

# key -> (compiled kernel, the values of the kernel's parameters passed in meta, in signature
# order); None: always launch through kernel[grid].
_compiled: dict[Hashable, tuple[Any, tuple] | None] = {}
_MAX_CACHED = 512
_MISSING = object()


def launch(
    kernel: Any, grid: tuple[int, int], args: tuple, meta: dict[str, Any], key: Hashable
) -> None:
    """Launch Triton `kernel` on a two-axis `grid` with positional `args` and keyword `meta`
    (constexpr parameters, then options such as ``num_warps``), as ``kernel[grid](*args,
    **meta)`` does, reusing the kernel compiled for an earlier launch with the same `key` (see
    the module docstring for what the key must determine). Raises what Triton raises.
    """
    entry = _compiled.get(key, _MISSING)
    if entry is _MISSING:  # first launch with this key: through Triton, which compiles it
        compiled = kernel[grid](*args, **meta)
        if len(_compiled) >= _MAX_CACHED:
            _compiled.clear()
        _compiled[key] = _runner_entry(kernel, compiled, len(args), meta)
    elif entry is None:
        kernel[grid](*args, **meta)
    else:
        compiled, constants = entry
        # The runner takes every kernel parameter in signature order, constexprs included.
        compiled[(grid[0], grid[1], 1)](*args, *constants)


def _runner_entry(kernel: Any, compiled: Any, positional: int, meta: dict[str, Any]):
    """(compiled, the meta values that are kernel parameters, in order) when `compiled` can be
    launched directly with all of `kernel`'s parameters; None otherwise."""
    names = getattr(kernel, "arg_names", None)
    if names is None or not hasattr(type(compiled), "__getitem__"):
        return None
    rest = tuple(names[positional:])
    if not all(name in meta for name in rest):  # a parameter left to its default
        return None
    return compiled, tuple(meta[name] for name in rest)


def clear() -> None:
    """Forget every cached compiled kernel (tests; the next launch of each key binds again)."""
    _compiled.clear()
