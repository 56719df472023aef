"""roi_ops: exact, fast, batched region-of-interest max pooling for PyTorch.

>>> import torch, roi_ops
>>> x = torch.randn(2, 256, 50, 68)
>>> boxes = [torch.tensor([[0.0, 0.0, 320.0, 240.0]]), torch.tensor([[64.0, 32.0, 500.0, 400.0]])]
>>> roi_ops.roi_pool(x, boxes, output_size=7, spatial_scale=1 / 16).shape
torch.Size([2, 256, 7, 7])
"""

from . import ops as _ops  # noqa: F401  (registers the torch.library ops)
from .backend import (
    ALL_FLOAT_DTYPES,
    Backend,
    RoIPoolBackwardProblem,
    RoIPoolProblem,
    accumulate_dtype,
)
from .bad_rois import check_errors
from .config import set_value_checks, value_check_mode, value_checks, value_checks_enabled
from .dispatch import (
    BackendError,
    BackendNotFoundError,
    BackendUnavailableError,
    Explanation,
    resolve_backend,
    use_backend,
)
from .functional import RoIPool, explain, roi_pool, roi_pool_with_argmax
from .host_memory import HostMemoryStats, host_memory_stats, release_host_memory
from .multi_scale import MultiScaleRoIPool, multi_scale_roi_pool
from .registry import BackendInfo, list_backends, register_backend, unregister_backend
from .torchvision_compat import (
    TorchvisionPatch,
    patch_torchvision,
    torchvision_patched,
    unpatch_torchvision,
)

__version__ = "0.1.0"

__all__ = [
    "ALL_FLOAT_DTYPES",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BackendNotFoundError",
    "BackendUnavailableError",
    "Explanation",
    "HostMemoryStats",
    "MultiScaleRoIPool",
    "RoIPool",
    "RoIPoolBackwardProblem",
    "RoIPoolProblem",
    "TorchvisionPatch",
    "accumulate_dtype",
    "check_errors",
    "explain",
    "host_memory_stats",
    "list_backends",
    "multi_scale_roi_pool",
    "patch_torchvision",
    "register_backend",
    "release_host_memory",
    "resolve_backend",
    "roi_pool",
    "roi_pool_with_argmax",
    "set_value_checks",
    "torchvision_patched",
    "unpatch_torchvision",
    "unregister_backend",
    "use_backend",
    "value_check_mode",
    "value_checks",
    "value_checks_enabled",
]
