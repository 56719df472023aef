"""roi_ops' public conformance kit.

- `reference_roi_pool` / `reference_roi_pool_backward`: the slow scalar reference.
- `contract_cases`, `check_case`, `RoiPoolCase`: hand-picked inputs and exact comparison;
  `first_difference` says where two tensors first differ.
- `tie_heavy_features`: inputs full of ties, signed zeros, NaN and -inf.
- `MultiScaleCase`, `check_multi_scale_case`, `pyramid_case`: multi-level (FPN) calls checked
  level by level against the reference.
- `roi_pool_cases`, `multi_scale_cases` (hypothesis strategies; need `hypothesis`).
- `BackendConformance`: a pytest base class for a plugin's own test suite (needs `pytest`).
"""

from __future__ import annotations

from .cases import (
    RoiPoolCase,
    check_case,
    contract_cases,
    first_difference,
    tie_heavy_features,
)
from .multi_scale import MultiScaleCase, check_multi_scale_case, pyramid_case
from .reference import reference_roi_pool, reference_roi_pool_backward

__all__ = [
    "BackendConformance",
    "MultiScaleCase",
    "RoiPoolCase",
    "check_case",
    "check_multi_scale_case",
    "contract_cases",
    "first_difference",
    "multi_scale_cases",
    "pyramid_case",
    "reference_roi_pool",
    "reference_roi_pool_backward",
    "roi_pool_cases",
    "tie_heavy_features",
]


def __getattr__(name: str):
    # pytest and hypothesis are test-only dependencies: import them on first use.
    if name == "BackendConformance":
        from .conformance import BackendConformance

        return BackendConformance
    if name in ("roi_pool_cases", "multi_scale_cases"):
        from . import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'roi_ops.testing' has no attribute {name!r}")
