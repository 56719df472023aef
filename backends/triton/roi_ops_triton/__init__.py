"""roi_ops' Triton backend: RoI max pooling kernels for CUDA GPUs.

Importing this package is cheap: Triton is imported only when the backend is checked or used
(`roi_ops_triton.backend.TritonBackend`), and the kernels live in `roi_ops_triton.kernels`.
"""

__version__ = "0.1.0"
