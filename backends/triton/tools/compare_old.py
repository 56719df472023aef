"""The old single-file Triton kernels against the current ones, without a GPU.

Developer tool (CPU only; ``ptx`` needs Triton's NVIDIA backend, which the Triton wheel brings).
Two reports:

``launch``: for every bench workload, float16/bfloat16/float32/float64, NCHW and channels_last,
with and without the argmax, the forward and backward launches that the old host code and the
current `Runner` make on a device of ``--sms`` SMs and ``--l2-mib`` MiB of L2 (an H200's by
default): kernel, grid, ``num_warps``, every constexpr and runtime argument, and the kernels'
``do_not_specialize`` lists. Launches are recorded, not run; tensors are on the meta device
(shapes and strides, no memory). Every difference is printed, then a count. The
current kernels' extra arguments (``log_ptr``, ``s_w``, ``REPORT_BAD``, the unit kernel's
``CHANNELS`` at 4, the old kernel's hand-unrolled count) and the old backward's batch index
(the new one reads the ROIs) are expected, not differences.

``ptx``: compiles the old and current unit and channels_last kernels for sm_90 (every dtype,
with and without the argmax) and prints, per variant: registers and spills, PTX instructions,
global loads in the innermost loop, and whether the two kernels' PTX bodies are the same
instruction for instruction after register, label and parameter names are dropped (else how
many instructions moved, or how many lines differ). Exit status 1 when any variant's instruction
counts differ.

The old kernels come from git (``--old REV``, default b875d4c) or a folder holding kernels.py and
launcher.py (``--old DIR``), as in ``tools/probe.py``.

Usage:
    python backends/triton/tools/compare_old.py launch
    python backends/triton/tools/compare_old.py ptx
"""

from __future__ import annotations

import argparse
import collections
import difflib
import os
import re
import sys
from typing import Any

import torch

OLD_REVISION = "b875d4c"
H200_SMS = 132
H200_L2_MIB = 60
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
KERNEL_NAMES = {  # old kernel -> current kernel
    "_roi_pool_fwd_unit_kernel": "roi_pool_forward_unit",
    "_roi_pool_fwd_cl_kernel": "roi_pool_forward_channels_last",
    "_roi_pool_fwd_kernel": "roi_pool_forward_flat",
    "_roi_pool_bwd_kernel": "roi_pool_backward_scatter",
}
# Arguments only one side has, by design (see the module docstring).
EXPECTED_ONLY_NEW = {
    "log_ptr", "s_w", "REPORT_BAD", "CHANNELS", "rois_ptr", "N", "s_rk", "ROIS_F64"
}  # fmt: skip
EXPECTED_ONLY_OLD = {"batch_ptr"}


def load_old(source: str):
    """The old kernels module (see tools/probe.py)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from probe import load_old as probe_load_old

    return probe_load_old(source)


# ------------------------------------------------------------------------------------------------
# Launches
# ------------------------------------------------------------------------------------------------


def _view(shape, strides, dtype) -> torch.Tensor:
    """A meta tensor (no memory; data_ptr 0, 16-byte aligned) with these shape and strides."""
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


def _named(kernel: Any, args: tuple, meta: dict[str, Any], labels: dict[int, str]) -> dict:
    """The launch's arguments by parameter name; tensors by their role."""
    named = {}
    for name, value in zip(kernel.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor) or hasattr(value, "data_ptr"):
            value = labels.get(id(value), f"tensor {getattr(value, 'dtype', '?')}")
        named[name] = value
    named.update(meta)
    return named


def _workload_launches(old, launch_module, w, dtype, channels_last, needs_argmax, sizes):
    """([(kernel name, grid, named args)] old, the same new) for one call shape."""
    from roi_ops.backend import RoIPoolBackwardProblem, RoIPoolProblem
    from roi_ops.bench.workloads import make_rois

    n, c, h, wd = w.num_images, w.channels, w.height, w.width
    if channels_last:
        strides = (h * wd * c, 1, wd * c, c)
    else:
        strides = (c * h * wd, h * wd, wd, 1)
    x = _view((n, c, h, wd), strides, dtype)
    rois = make_rois(w, torch.float32 if dtype == torch.bfloat16 else dtype, "cpu")
    size, scale = w.output_size, w.spatial_scale
    k = rois.shape[0]
    out = _view((k, c, size, size), (c * size * size, size * size, size, 1), dtype)
    arg = _view((k, c, size, size), (c * size * size, size * size, size, 1), torch.int32)
    grad = _view((k, c, size, size), (c * size * size, size * size, size, 1), dtype)
    labels = {id(x): "input", id(rois): "rois", id(out): "output", id(grad): "grad_output"}
    if needs_argmax:
        labels[id(arg)] = "argmax"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    old_calls, new_calls = [], []

    def old_record(kernel, grid, args, meta, device_index):
        old_calls.append((kernel.__name__, grid, _named(kernel, args, meta, labels)))

    def new_record(kernel, grid, args, meta, key):
        new_calls.append((kernel.__name__, grid, _named(kernel, args, meta, labels)))

    old.launcher.launch = old_record
    old._device_sizes = lambda device: sizes
    launch_module.launch_cache.launch = new_record
    launch_module.device_sizes = lambda index: sizes
    old.roi_pool_forward(x, rois, size, size, scale, out, arg if needs_argmax else None)
    runner = launch_module.Runner()
    problem = RoIPoolProblem(x, rois, size, size, scale, needs_argmax)
    runner.forward(problem, out, arg if needs_argmax else None)
    if needs_argmax:
        batch = torch.zeros(k, dtype=torch.int64, device="meta")
        labels[id(batch)] = "batch_index"
        old.roi_pool_backward(grad, arg, batch, (n, c, h, wd), dtype, memory_format)
        shape = (n, c, h, wd)
        runner.backward(RoIPoolBackwardProblem(grad, arg, rois, shape, dtype, memory_format))
    return old_calls, new_calls


def _compare_calls(old_calls, new_calls) -> list[str]:
    problems = []
    if len(old_calls) != len(new_calls):
        return [f"{len(old_calls)} old launches, {len(new_calls)} new"]
    for (old_name, old_grid, old_args), (new_name, new_grid, new_args) in zip(
        old_calls, new_calls, strict=True
    ):
        if KERNEL_NAMES.get(old_name) != new_name:
            problems.append(f"kernel {old_name} -> {new_name}")
            continue
        if old_grid != new_grid:
            problems.append(f"{new_name}: grid {old_grid} -> {new_grid}")
        renamed = {"LANES": "BLOCK_B"} if new_name == "roi_pool_forward_flat" else {}
        for name in sorted(set(old_args) | set(new_args)):
            old_value = old_args.get(renamed.get(name, name), "<none>")
            new_value = new_args.get(name, "<none>")
            if old_value == new_value:
                continue
            if name in EXPECTED_ONLY_NEW and old_value == "<none>":
                if name != "CHANNELS" or new_value == 4:
                    continue
            if name in EXPECTED_ONLY_OLD and new_value == "<none>":
                continue
            problems.append(f"{new_name}: {name} {old_value!r} -> {new_value!r}")
    return problems


def _specialisation_lists(old) -> list[str]:
    from roi_ops_triton import backward, forward

    problems = []
    for old_name, new_name in KERNEL_NAMES.items():
        old_kernel = getattr(old, old_name)
        module = backward if new_name.startswith("roi_pool_backward") else forward
        new_kernel = getattr(module, new_name)
        old_list = {p.name for p in old_kernel.params if p.do_not_specialize}
        new_list = {p.name for p in new_kernel.params if p.do_not_specialize}
        extra = new_list - old_list - EXPECTED_ONLY_NEW
        missing = old_list - new_list - EXPECTED_ONLY_OLD
        if old_name == "_roi_pool_bwd_kernel":
            extra -= {"N"}  # the image index is read from the ROIs and clamped into [0, N)
        if extra or missing:
            problems.append(
                f"{new_name}: do_not_specialize adds {sorted(extra)}, drops {sorted(missing)}"
            )
        print(f"{new_name:32s} do_not_specialize {sorted(new_list)}")
    return problems


def launch_report(args) -> int:
    from roi_ops.bench.workloads import WORKLOADS
    from roi_ops_triton import launch as launch_module

    old = load_old(args.old)
    sizes = (args.sms, args.l2_mib * 2**20)
    problems = _specialisation_lists(old)
    checked = 0
    for w in WORKLOADS.values():
        for dtype_name, dtype in DTYPES.items():
            for channels_last in (False, True):
                for needs_argmax in (True, False):
                    old_calls, new_calls = _workload_launches(
                        old, launch_module, w, dtype, channels_last, needs_argmax, sizes
                    )
                    layout = "channels_last" if channels_last else "nchw"
                    mode = "fwd+bwd" if needs_argmax else "infer"
                    where = f"{w.name} {dtype_name} {layout} {mode}"
                    found = _compare_calls(old_calls, new_calls)
                    checked += len(new_calls)
                    problems += [f"{where}: {p}" for p in found]
                    if args.verbose:
                        for name, grid, named in new_calls:
                            sizes_text = {
                                key: named[key]
                                for key in ("LANES", "CHANNELS", "chan_per_prog", "BLOCK_C",
                                            "BLOCK_B", "VEC", "BLOCK", "num_warps")
                                if key in named
                            }  # fmt: skip
                            print(f"{where}: {name} grid {grid} {sizes_text}")
    for problem in problems:
        print("DIFFERENT", problem)
    print(f"{checked} launches compared on {args.sms} SMs, {args.l2_mib} MiB L2: "
          f"{len(problems)} differences")  # fmt: skip
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------------
# PTX
# ------------------------------------------------------------------------------------------------

_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def _ptx_body(ptx: str) -> list[str]:
    """The kernel's instructions, without debug lines, with register, label and parameter names
    dropped."""
    text = ptx[ptx.index(".entry") : ptx.index("$L__func_end0")]
    body = []
    for line in text.splitlines():
        line = line.split("//")[0].strip()
        if not line or line.startswith((".loc", "$L__tmp", ".file")):
            continue
        line = re.sub(r"%(r|rd|p|rs|f|fd|h)\d+", r"%\1", line)
        line = re.sub(r"\$L__BB0_\d+", "L", line)
        line = re.sub(r"\w+_param_\d+", "PARAM", line)
        body.append(line)
    return body


def innermost_loop_loads(ptx: str) -> list[int]:
    """Global loads in each innermost loop of the PTX."""
    from roi_ops_triton.ptx_check import innermost_loops

    return [sum("ld.global" in line for line in loop) for loop in innermost_loops(ptx)]


def _signature(dtype_name: str, old: bool) -> tuple[dict[str, str], dict[str, Any]]:
    t = _TYPES[dtype_name]
    rois = {"bfloat16": "fp32"}.get(dtype_name, t)
    pointers = {"inp_ptr": f"*{t}", "rois_ptr": f"*{rois}", "out_ptr": f"*{t}", "arg_ptr": "*i32"}
    if not old:
        pointers["log_ptr"] = "*i64"
    shapes = {name: "i32" for name in ("N", "C", "H", "W", "PH", "PW", "s_n", "s_c", "s_h")}
    flags = dict(GEOM_HALF=dtype_name == "float16", GEOM_F64=dtype_name == "float64",
                 ACC_F64=dtype_name == "float64")  # fmt: skip
    return {**pointers, **shapes}, flags


def _variants(old):
    """(name, old kernel, old signature, old constexprs, new kernel, new signature, new
    constexprs, warps) for each compared variant."""
    from roi_ops_triton import forward

    tail = {"s_rk": "i32", "s_rj": "i32", "scale_f32": "fp32", "scale_bits": "i64",
            "blk_offset": "i32"}  # fmt: skip
    for dtype_name in DTYPES:
        for needs_argmax in (True, False):
            suffix = f"{dtype_name}{'' if needs_argmax else '-inference'}"
            old_sig, flags = _signature(dtype_name, True)
            new_sig, _ = _signature(dtype_name, False)
            flags["NEEDS_ARGMAX"] = needs_argmax
            yield (
                f"unit-{suffix}",
                old._roi_pool_fwd_unit_kernel, {**old_sig, **tail, "chan_per_prog": "i32"},
                {**flags, "LANES": 256},
                forward.roi_pool_forward_unit,
                {**new_sig, "s_w": "i32", **tail, "chan_per_prog": "i32"},
                {**flags, "LANES": 256, "CHANNELS": 4, "REPORT_BAD": False}, 8,
            )  # fmt: skip
            element = torch.empty((), dtype=DTYPES[dtype_name]).element_size()
            block_c = 128 // element
            cl = {**flags, "BLOCK_C": block_c, "BLOCK_B": 64, "VEC": 16 // element,
                  "EVEN_C": True, "C_UNIT": True}  # fmt: skip
            yield (
                f"cl-{suffix}",
                old._roi_pool_fwd_cl_kernel, {**old_sig, "s_w": "i32", **tail}, cl,
                forward.roi_pool_forward_channels_last, {**new_sig, "s_w": "i32", **tail},
                {**cl, "REPORT_BAD": False}, 4,
            )  # fmt: skip


def ptx_report(args) -> int:
    from roi_ops_triton import ptx_check

    old = load_old(args.old)
    failed = False
    print("variant | old regs | new regs | old instr | new instr | inner loads old/new | same")
    for name, ok, osig, oconst, nk, nsig, nconst, warps in _variants(old):
        old_kernel = ptx_check._compile(ok, osig, oconst, args.arch, warps)
        new_kernel = ptx_check._compile(nk, nsig, nconst, args.arch, warps)
        old_ptx, new_ptx = old_kernel.asm["ptx"], new_kernel.asm["ptx"]
        old_body, new_body = _ptx_body(old_ptx), _ptx_body(new_ptx)
        changed = [
            line
            for line in difflib.unified_diff(old_body, new_body, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
            and "PARAM" not in line and ".entry" not in line
        ]  # fmt: skip
        old_ops = collections.Counter(line.split()[0] for line in old_body if ".param" not in line)
        new_ops = collections.Counter(line.split()[0] for line in new_body if ".param" not in line)
        same_counts = old_ops == new_ops
        verdict = (
            "identical" if not changed
            else f"same instructions, {len(changed) // 2} moved" if same_counts
            else f"{len(changed)} lines differ"
        )  # fmt: skip
        failed = failed or not same_counts
        print(
            f"{name} | {ptx_check._resources(old_kernel.asm['cubin'])} | "
            f"{ptx_check._resources(new_kernel.asm['cubin'])} | {sum(old_ops.values())} | "
            f"{sum(new_ops.values())} | "
            f"{innermost_loop_loads(old_ptx)}/{innermost_loop_loads(new_ptx)} | {verdict}",
            flush=True,
        )
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            for tag, kernel in (("old", old_kernel), ("new", new_kernel)):
                for ext in ("ttgir", "ptx"):
                    with open(os.path.join(args.dump, f"{name}.{tag}.{ext}"), "w") as f:
                        f.write(kernel.asm[ext])
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", choices=("launch", "ptx"))
    parser.add_argument("--old", default=OLD_REVISION, help="git revision or folder")
    parser.add_argument("--sms", type=int, default=H200_SMS, help="SM count (launch)")
    parser.add_argument("--l2-mib", type=int, default=H200_L2_MIB, help="L2 MiB (launch)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (ptx)")
    parser.add_argument("--dump", help="folder for each variant's TTGIR and PTX (ptx)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every launch")
    args = parser.parse_args(argv)
    if args.report == "ptx" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    return launch_report(args) if args.report == "launch" else ptx_report(args)


if __name__ == "__main__":
    sys.exit(main())
