"""Whether Triton runs kernels in its CPU interpreter, read the way Triton reads it.

The backend declaration, the kernel modules and the tests all ask this one function, so that
``TRITON_INTERPRET`` has a single meaning here: Triton's own.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` turns Triton's interpreter on, parsed as Triton parses it:
    through ``triton.knobs`` where it exists (1, true, on or yes, any case), else, for older
    Triton (or none), exactly ``1``.

    Reads the environment on every call. The kernels are defined compiled or interpreted once,
    when `roi_ops_triton.device` is first imported.
    """
    try:
        from triton import knobs
    except ImportError:  # Triton before 3.4 has no knobs (or Triton is missing)
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)
