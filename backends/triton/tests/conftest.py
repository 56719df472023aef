"""The Triton backend's tests: without a GPU, the kernels run in Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton defines the kernels, so it is set here, when
pytest loads this file, unless a CUDA device is present (then the compiled kernels are tested
on CUDA tensors, unless the environment asks for the interpreter).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
