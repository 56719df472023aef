"""Calling a backend's methods directly, below roi_ops' dispatch, the way a plugin's kernel tests
do: on poisoned outputs, compared bit for bit with the reference."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..backend import Backend, MultiScaleRoIPoolProblem, RoIPoolProblem
from .cases import assert_same_bits

ForwardResult = tuple[torch.Tensor, torch.Tensor | None]


def poisoned_forward(
    backend: Backend, problem: RoIPoolProblem | MultiScaleRoIPoolProblem
) -> ForwardResult:
    """Run `backend.forward` (`forward_multi_scale` for a multi-level problem) on outputs
    poisoned with NaN and argmax poisoned with -7, on the problem's device, so that any element
    the backend leaves unwritten shows.

    Returns:
        (output, argmax), argmax None when the problem does not need one.
    """
    shape, device = problem.output_shape, problem.device
    output = torch.full(shape, math.nan, dtype=problem.dtype, device=device)
    argmax = None
    if problem.needs_argmax:
        argmax = torch.full(shape, -7, dtype=torch.int32, device=device)
    if isinstance(problem, MultiScaleRoIPoolProblem):
        backend.forward_multi_scale(problem, output, argmax)
    else:
        backend.forward(problem, output, argmax)
    return output, argmax


def check_with_and_without_argmax(
    run: Callable[[bool], ForwardResult], expected: torch.Tensor, expected_argmax: torch.Tensor
) -> ForwardResult:
    """Assert a forward matches the reference in both modes.

    Args:
        run: ``run(needs_argmax)`` -> (output, argmax or None), e.g. a `poisoned_forward` call.
        expected: the reference's output (on any device).
        expected_argmax: the reference's argmax (on any device).

    With the argmax, the output must equal `expected` bit for bit and the argmax
    `expected_argmax`; without, the output must be the same and the argmax None.

    Returns:
        The (output, argmax) of the call with the argmax.
    """
    output, argmax = run(True)
    assert_same_bits(output, expected, "output")
    assert argmax is not None, "no argmax came back from a call that needs one"
    assert_same_bits(argmax, expected_argmax, "argmax")
    inference, none = run(False)
    assert none is None, "an argmax came back from a call that needs none"
    assert_same_bits(inference, expected, "output without argmax")
    return output, argmax
