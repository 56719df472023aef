"""Run the CuPy backend's kernels on the CPU: build and drive ``host_emulator.cpp``.

`build` compiles the real kernel source (``kernels.source()``) as host C++ with the emulator's
stand-ins for CUDA, instantiating every name in ``kernels.all_names()``; `Emulator.launch` runs a
`kernels.Launch` on CPU tensors as CuPy would run it on CUDA tensors. The backend's tests use it
on machines without a GPU.

    from emulator import build            # with backends/cupy/tools on sys.path
    emulator = build(Path("/tmp/emulator"))
    emulator.launch(planning.plan_forward(problem, output, argmax, sizes))
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import torch

from roi_ops_cupy import kernels

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "host_emulator.cpp"
FLAGS = ("-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread", "-Wall")
FLAGS += ("-Wno-unknown-pragmas",)


class Emulator:
    """The compiled emulator: runs kernel launches on CPU tensors, one block at a time."""

    device = torch.device("cpu")

    def __init__(self, library: ctypes.CDLL):
        self.library = library
        self._run = library.roi_emulate
        self._run.restype = ctypes.c_int
        self._run.argtypes = [
            ctypes.c_char_p,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_uint,
            ctypes.c_ulonglong,
        ]

    def launch(self, launch: kernels.Launch) -> None:
        """Run `launch` (its pointers must address CPU memory).

        Raises:
            RuntimeError: the emulator refused it (unknown name, too much shared memory, too
                many threads, or the wrong number of arguments), or the kernel made a
                misaligned 16-byte access.
        """
        words = launch.words()
        pointer = words.ctypes.data_as(ctypes.POINTER(ctypes.c_uint64))
        grid_x, grid_y, _ = launch.grid
        status = self._run(
            launch.name.encode(),
            grid_x,
            grid_y,
            *launch.block[:2],
            pointer,
            len(words),
            launch.shared_mem,
        )
        if status != 0:
            reasons = {
                -1: "unknown kernel",
                -2: "too much shared memory",
                -3: "bad block size",
                -5: "a misaligned 16-byte access",
            }
            reason = reasons.get(status, "wrong number of arguments")
            raise RuntimeError(f"the emulator refused {launch.name}: {reason} ({status})")


def compiler() -> str | None:
    """The host C++ compiler (g++ or c++), or None."""
    return shutil.which("g++") or shutil.which("c++")


def build(directory: Path) -> Emulator:
    """Compile the emulator in `directory` (created if missing) and load it.

    Raises:
        RuntimeError: no C++ compiler, or the build failed (its log in the message).
    """
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or c++) for the host emulator")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "roi_ops_kernels.cu").write_text(kernels.source(), encoding="utf-8")
    lines = [f'ROI_KERNEL("{name}", {name})' for name in kernels.all_names()]
    (directory / "roi_ops_kernel_names.inc").write_text("\n".join(lines) + "\n")
    target = directory / "host_emulator.so"
    command = [cxx, *FLAGS, f"-I{directory}", str(SOURCE), "-o", str(target)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"building the host emulator failed:\n{result.stderr[-20000:]}")
    return Emulator(ctypes.CDLL(str(target)))
