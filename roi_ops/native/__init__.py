"""roi_pool's autograd node in C++ (`autograd_node.cpp`), compiled on this machine, for the eager
fast path of calls that need a gradient.

A Python `torch.autograd.Function` spends several microseconds per call in its apply and again
in its Python backward node; a small CUDA call's kernel takes less. When this module's
extension is built, `roi_ops.autograd.apply_with_gradient` attaches a C++ node to the output
instead, which saves the same state and calls the same Python gradient,
`roi_ops.autograd.gradient`. Results are identical either way.

The extension is compiled with `torch.utils.cpp_extension` (a C++ compiler, ninja and Python's
headers are needed) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), once per source and torch version. The first call that needs a
gradient starts the build in a background thread and runs the Python path until it is done;
`build` builds (or loads) it at once, and ``python -m roi_ops build-native`` does that from the
shell. ``ROI_OPS_NATIVE=0`` (read at that first call) stops the automatic build, so only an
explicit `build` puts the extension in use. Where the build fails, roi_ops keeps the Python
path and `status` says why.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("autograd_node.cpp")

# The C++ attach (see autograd_node.cpp) once the extension is loaded, else None: the one
# thing the hot path reads.
attach: Callable | None = None
# The exception of a failed build, else None.
build_error: Exception | None = None

_status = "not started"
_started = False
_lock = threading.Lock()
_done = threading.Event()


def status() -> str:
    """In words: whether the extension is in use, being built, off, or why it failed."""
    return _status


def _disabled() -> bool:
    return os.environ.get("ROI_OPS_NATIVE", "1").strip() == "0"


def _extension_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return f"roi_ops_native_{digest}"


def _load() -> None:
    global attach, _status, build_error
    try:
        from torch.utils.cpp_extension import load

        from ..autograd import gradient

        module = load(
            name=_extension_name(), sources=[str(SOURCE)], extra_cflags=["-O2"], verbose=False
        )
        module.set_gradient(gradient)
        attach = module.attach
        _status = f"in use ({module.__file__})"
    except Exception as error:  # no compiler, no headers, a read-only cache: keep Python's
        build_error = error
        text = " ".join(str(error).split())
        text = text if len(text) <= 300 else text[:300] + " ..."
        _status = (
            "build failed, so calls keep the Python autograd path (roi_ops.native.build_error "
            f"has the whole error): {type(error).__name__}: {text}"
        )
    finally:
        _done.set()


def start() -> None:
    """Start building (or loading) the extension in a background thread, once per process,
    unless ``ROI_OPS_NATIVE=0``. Cheap after the first call."""
    global _started, _status
    if _started:
        return
    with _lock:
        if _started:
            return
        _started = True
        if _disabled():
            _status = "off (ROI_OPS_NATIVE=0)"
            _done.set()
            return
        _status = "building"
        threading.Thread(target=_load, name="roi_ops-native-build", daemon=True).start()


def build(timeout: float | None = None) -> bool:
    """Build (or load from torch's extension cache) the extension now, whatever
    ``ROI_OPS_NATIVE`` says, and wait for it at most `timeout` seconds (None: no limit).
    Returns whether it is in use; `status` says why not."""
    global _started, _status
    with _lock:
        if not _started or (_status.startswith("off") and attach is None):
            _started = True
            _done.clear()
            _status = "building"
            threading.Thread(target=_load, name="roi_ops-native-build", daemon=True).start()
    _done.wait(timeout)
    return attach is not None


def wait(timeout: float | None = None) -> bool:
    """Start the automatic build (unless ``ROI_OPS_NATIVE=0``) and wait for it at most `timeout`
    seconds. Returns whether the extension is in use."""
    start()
    _done.wait(timeout)
    return attach is not None


def _forget_in_child() -> None:
    # A forked child has no build thread: let it start its own.
    global _started, _lock, _done, _status
    if attach is None:
        _started, _status = False, "not started"
        _lock, _done = threading.Lock(), threading.Event()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
