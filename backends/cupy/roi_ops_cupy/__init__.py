"""roi_ops_cupy: the CuPy (CUDA C, NVRTC) backend for roi_ops (entry point ``cupy``).

Importing this package does not import CuPy; kernels are compiled on first use.
"""

from roi_ops_cupy.backend import CupyBackend

__all__ = ["CupyBackend"]
__version__ = "0.1.0"
