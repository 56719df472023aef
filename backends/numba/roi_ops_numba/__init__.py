"""roi_ops_numba: the numba CPU backend for roi_ops (entry point ``numba`` in ``roi_ops.backends``).

Importing this package does not import numba; the kernels are loaded on first use.
"""

from roi_ops_numba.backend import NumbaBackend

__all__ = ["NumbaBackend"]
__version__ = "0.1.0"
