"""roi_ops' Triton backend: RoI max pooling kernels for CUDA GPUs, the portable GPU backend.

Importing this package is cheap: Triton is imported only when the backend is checked or used
(`roi_ops_triton.backend.TritonBackend`). The kernels live in `roi_ops_triton.forward` and
`roi_ops_triton.backward` with their shared helpers in `roi_ops_triton.device`; the host side
in `roi_ops_triton.launch`, its sizes in `roi_ops_triton.tuning`.
"""

__version__ = "0.1.0"
