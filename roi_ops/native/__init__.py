"""roi_pool's autograd node in C++ (`autograd_node.cpp`), compiled on this machine, for the eager
fast path of calls that need a gradient.

A Python `torch.autograd.Function` spends several microseconds per call in its apply and again
in its Python backward node; a small CUDA call's kernel takes less. When this module's
extension is loaded, `roi_ops.autograd.apply_with_gradient` attaches a C++ node to the output
instead, which saves the same state and calls the same Python gradient,
`roi_ops.autograd.gradient`. Results are identical either way.

The extension is compiled with `torch.utils.cpp_extension` (a C++ compiler, ninja and Python's
headers are needed) into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), once per source, torch, Python and checkout. The first call
that needs a gradient starts that build in a child process (so the compiler's driver never
competes with the caller's threads for the GIL) and calls run the Python path until the child
is done; the next call then loads the compiled module. `build` builds (or loads) it at once in
this process, and ``python -m roi_ops build-native`` does that from the shell.
``ROI_OPS_NATIVE=0`` (read at that first call) stops the automatic build, so only an explicit
`build` puts the extension in use. Where the build fails, roi_ops keeps the Python path and
`status` says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import IO

import torch

SOURCE = Path(__file__).with_name("autograd_node.cpp")
NATIVE_ENV = "ROI_OPS_NATIVE"

# The C++ attach (see autograd_node.cpp) once the extension is loaded, else None: the one
# thing the hot path reads.
attach: Callable | None = None
# The exception of a failed build, else None.
build_error: Exception | None = None

_status = "not started"
_started = False
_finished = False
_child: subprocess.Popen | None = None
_child_output: IO[bytes] | None = None
_lock = threading.Lock()


def status() -> str:
    """In words: whether the extension is in use, being built, off, or why it failed."""
    return _status


def _disabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1").strip() == "0"


def _extension_name() -> str:
    """A name per source text, torch, Python and checkout: torch's cache rebuilds a name whose
    build command changed (another checkout's path, another Python's headers), so two
    environments sharing one cache would otherwise rebuild each other's module in turn."""
    key = "\0".join(
        (torch.__version__, sys.implementation.cache_tag or "", str(SOURCE.resolve()))
    ).encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + key).hexdigest()[:12]
    return f"roi_ops_native_{digest}"


def _compile() -> ModuleType:
    from torch.utils.cpp_extension import load

    return load(name=_extension_name(), sources=[str(SOURCE)], extra_cflags=["-O2"], verbose=False)


def _use(module: ModuleType) -> None:
    global attach, _status
    from ..autograd import gradient

    module.set_gradient(gradient)
    attach = module.attach
    _status = f"in use ({module.__file__})"


def _fail(error: Exception) -> None:
    global _status, build_error
    build_error = error
    text = " ".join(str(error).split())
    text = text if len(text) <= 300 else text[:300] + " ..."
    _status = (
        "build failed, so calls keep the Python autograd path (roi_ops.native.build_error "
        f"has the whole error): {type(error).__name__}: {text}"
    )


def build() -> bool:
    """Build (or load from torch's extension cache) the extension now, in this process, whatever
    ``ROI_OPS_NATIVE`` says. Returns whether it is in use; `status` says why not."""
    global _started, _finished
    with _lock:
        _started = _finished = True  # no automatic build after this
        if attach is None:
            try:
                _use(_compile())
            except Exception as error:  # no compiler, no headers, a read-only cache
                _fail(error)
    return attach is not None


def start() -> None:
    """The hot path's hook while the extension is not in use: the first call starts the build
    in a child process (unless ``ROI_OPS_NATIVE=0``); later calls check, without waiting,
    whether it has finished, and load the module when it has. Cheap once it has finished."""
    global _started, _finished, _status, _child, _child_output
    if _finished:
        return
    if _started:
        if _child is not None and _child.poll() is not None:
            _finish_child()
        return
    with _lock:
        if _started:
            return
        _started = True
        if _disabled():
            _status = "off (ROI_OPS_NATIVE=0)"
            _finished = True
            return
        _status = "building"
        try:
            _child_output = tempfile.TemporaryFile()
            code = "import roi_ops.native as native; native._child_main()"
            _child = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.DEVNULL,
                stdout=_child_output,
                stderr=subprocess.STDOUT,
            )
        except Exception as error:
            if _child_output is not None:
                _child_output.close()
            _fail(error)
            _finished = True


def _child_main() -> None:
    """The child process of `start`: compile (or load) and print the module's path last."""
    print(_compile().__file__)


def _finish_child() -> None:
    global _finished, _child
    with _lock:
        if _finished or _child is None:
            return
        returncode, output = _child.returncode, b""
        if _child_output is not None:
            _child_output.seek(0)
            output = _child_output.read()
            _child_output.close()
        _child, _finished = None, True
        text = output.decode(errors="replace").strip()
        try:
            if returncode != 0:
                raise RuntimeError(f"the build process exited with status {returncode}: {text}")
            path = text.splitlines()[-1]
            spec = importlib.util.spec_from_file_location(_extension_name(), path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _use(module)
        except Exception as error:
            _fail(error)


def wait(timeout: float | None = None) -> bool:
    """Start the automatic build (unless ``ROI_OPS_NATIVE=0``) and wait for it at most `timeout`
    seconds (None: no limit). Returns whether the extension is in use."""
    start()
    child = _child
    if child is not None:
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        _finish_child()
    return attach is not None


def _forget_in_child() -> None:
    # A forked child is not the build process's parent: let it start its own.
    global _started, _finished, _status, _child, _child_output, _lock
    if attach is None:
        _started = _finished = False
        _status, _child, _child_output = "not started", None, None
        _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
