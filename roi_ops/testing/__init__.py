"""roi_ops' public conformance kit.

- `reference_roi_pool` / `reference_roi_pool_backward`: the slow scalar reference.
- `contract_cases`, `check_case`, `RoiPoolCase`: hand-picked inputs and exact comparison;
  `first_difference` says where two tensors first differ, `assert_same_bits` asserts there is
  no such place. `nans_with_payloads`: NaNs with distinct bits, for the bad-ROI log.
- `DTYPE_PAIRS`: the (input dtype, rois dtype) pairs the contract accepts; `dtype_id` names a
  dtype or a pair in test ids.
- `poisoned_forward`, `check_with_and_without_argmax`: a backend's own `forward` called
  directly on poisoned outputs, and checked in both modes against the reference.
- `registered_backend`: a backend registered for the duration of a test.
- `tie_heavy_features`: inputs full of ties, signed zeros, NaN and -inf.
- `MultiScaleCase`, `check_multi_scale_case`, `pyramid_case`: multi-level (FPN) calls checked
  level by level against the reference; `reference_by_level` is that reference for given levels.
- `roi_pool_cases`, `multi_scale_cases` (hypothesis strategies; need `hypothesis`).
- `BackendConformance`: a pytest base class for a plugin's own test suite (needs `pytest`).
"""

from __future__ import annotations

from .cases import (
    DTYPE_PAIRS,
    RoiPoolCase,
    assert_same_bits,
    check_case,
    contract_cases,
    dtype_id,
    first_difference,
    nans_with_payloads,
    tie_heavy_features,
)
from .direct import check_with_and_without_argmax, poisoned_forward
from .multi_scale import MultiScaleCase, check_multi_scale_case, pyramid_case, reference_by_level
from .reference import reference_roi_pool, reference_roi_pool_backward
from .registration import registered_backend

__all__ = [
    "DTYPE_PAIRS",
    "BackendConformance",
    "MultiScaleCase",
    "RoiPoolCase",
    "assert_same_bits",
    "check_case",
    "check_multi_scale_case",
    "check_with_and_without_argmax",
    "contract_cases",
    "dtype_id",
    "first_difference",
    "multi_scale_cases",
    "nans_with_payloads",
    "poisoned_forward",
    "pyramid_case",
    "reference_by_level",
    "reference_roi_pool",
    "reference_roi_pool_backward",
    "registered_backend",
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
