"""Compile the kernels for an NVIDIA target without a GPU and check the arithmetic in the PTX.

Usage: ``python -m roi_ops_triton.ptx_check [--arch 90] [--dump DIR]`` (``TRITON_INTERPRET``
must be off). It compiles variants of every kernel (the three forward kernels with each geometry
dtype, with and without the argmax and the bad-ROI report; the backward; the bad-ROI recorder;
the fused multi-level forward and backward kernels) and fails unless the PTX has:

* no fused multiply-add (a fused ``x * s - t`` would change C rounding and bin edges);
* correctly rounded divisions only (``div.rn``; Triton's ``/`` on float32 is ``div.full``);
* ``.rn`` on every float32/float64 multiply, add and subtract (so ptxas cannot fuse them);
* no flush-to-zero comparison (subnormal features must stay ordered);
* 64-bit atomic minimums where bad ROIs are reported, and 16-byte loads in the aligned
  channels_last variants;
* in the unit kernel and its multi-level form, a scan loop that loads each of a lane's
  channels once per element and clamps the column once for all of them, with no shared memory
  (a lane's channels stay in its thread).

Floor and ceil come out as ``cvt.rmi.ftz`` / ``cvt.rpi.ftz``: the kernels only floor values that
are zero or at least 2^-31 in magnitude, where flushing changes nothing. It prints registers
and spills per variant. This checks the installed Triton, not necessarily the GPU machine's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from .interpreter import interpreting

FLAT_VARIANTS: dict[str, dict[str, object]] = {
    "flat-float32": dict(),
    "flat-float32-inference-report": dict(NEEDS_ARGMAX=False, REPORT_BAD=True),
    "flat-float16-half-geometry": dict(inp="fp16", rois="fp16", out="fp16", GEOM_HALF=True),
    "flat-float16-float32-rois": dict(inp="fp16", out="fp16", LANES=64),
    "flat-float64": dict(inp="fp64", rois="fp64", out="fp64", GEOM_F64=True, ACC_F64=True),
}

UNIT_VARIANTS: dict[str, dict[str, object]] = {
    "unit-float32": dict(),
    "unit-float32-report": dict(REPORT_BAD=True),
    "unit-float32-inference": dict(NEEDS_ARGMAX=False),
    "unit-float32-two-channels": dict(CHANNELS=2, LANES=128),
    "unit-float32-one-channel": dict(CHANNELS=1),
    "unit-float16-half-geometry": dict(inp="fp16", rois="fp16", out="fp16", GEOM_HALF=True),
    "unit-bfloat16-inference": dict(inp="bf16", out="bf16", NEEDS_ARGMAX=False),
    "unit-float64": dict(inp="fp64", rois="fp64", out="fp64", GEOM_F64=True, ACC_F64=True),
}

# The channels_last kernel; VEC > 1 compiles the aligned variant (16-byte loads).
CL_VARIANTS: dict[str, dict[str, object]] = {
    "cl-float32": dict(),
    "cl-float32-inference-report": dict(NEEDS_ARGMAX=False, REPORT_BAD=True),
    "cl-float32-unaligned-odd-c": dict(VEC=1, EVEN_C=False),
    "cl-float16-half-geometry": dict(
        inp="fp16", rois="fp16", out="fp16", GEOM_HALF=True, BLOCK_C=64, VEC=8
    ),
    "cl-bfloat16-inference": dict(inp="bf16", out="bf16", BLOCK_C=64, VEC=8, NEEDS_ARGMAX=False),
    "cl-float64": dict(
        inp="fp64", rois="fp64", out="fp64", GEOM_F64=True, ACC_F64=True, BLOCK_C=16, VEC=2
    ),
}

_COMMON_DEFAULTS: dict[str, object] = dict(
    inp="fp32",
    rois="fp32",
    out="fp32",
    GEOM_HALF=False,
    GEOM_F64=False,
    ACC_F64=False,
    NEEDS_ARGMAX=True,
    REPORT_BAD=False,
)
_FLAT_DEFAULTS = _COMMON_DEFAULTS | {"LANES": 512}
_UNIT_DEFAULTS = _COMMON_DEFAULTS | {"LANES": 256, "CHANNELS": 4}
_CL_DEFAULTS = _COMMON_DEFAULTS | {
    "BLOCK_C": 32, "BLOCK_B": 64, "VEC": 4, "EVEN_C": True, "C_UNIT": True
}  # fmt: skip

# The forward kernels' runtime arguments after the pointers (s_n 64-bit: the widest case).
_FORWARD_RUNTIME = {
    "N": "i32", "C": "i32", "H": "i32", "W": "i32", "PH": "i32", "PW": "i32",
    "s_n": "i64", "s_c": "i32", "s_h": "i32", "s_w": "i32", "s_rk": "i32", "s_rj": "i32",
    "scale_f32": "fp32", "scale_bits": "i64", "blk_offset": "i32",
}  # fmt: skip
_UNIT_RUNTIME = _FORWARD_RUNTIME | {"chan_per_prog": "i32"}

_FORBIDDEN = {  # matched against instruction mnemonics at the start of a line
    "fused multiply-add": re.compile(r"^\s*(@%p\d+\s+)?(fma|mad)\.[a-z.]*f(32|64)", re.M),
    "approximate division": re.compile(r"^\s*(@%p\d+\s+)?div\.(full|approx)", re.M),
    "unrounded float op (ptxas may fuse it)": re.compile(
        r"^\s*(@%p\d+\s+)?(mul|add|sub)\.f(32|64)\s", re.M
    ),
    "flush-to-zero comparison": re.compile(r"^\s*(@%p\d+\s+)?setp\.[a-z]+\.ftz", re.M),
}


def _compile(fn, signature: dict[str, str], constexprs: dict[str, object], arch: int, warps=4):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full = dict(signature)
    full.update({name: "constexpr" for name in constexprs})
    # Pointers 16-byte aligned, as torch's allocations are (and as the launches specialise them).
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t[0] == "*"
    }
    source = ASTSource(fn, full, constexprs, aligned)
    options = {"num_warps": warps, "enable_fp_fusion": False}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _forward(kernel_name: str, defaults, variants, runtime, warps: int, name: str, arch: int):
    from roi_ops_triton import forward

    settings = {**defaults, **variants[name]}
    pointers = {f"{arg}_ptr": f"*{settings.pop(arg)}" for arg in ("inp", "rois", "out")}
    signature = {**pointers, "arg_ptr": "*i32", "log_ptr": "*i64", **runtime}
    return _compile(getattr(forward, kernel_name), signature, settings, arch, warps)


def _levels_forward(kind: str, dtype: str, arch: int, **flags):
    """A fused multi-level forward kernel (`multi_scale_kernels`), four levels."""
    from roi_ops_triton import multi_scale_kernels

    rois = "fp64" if dtype == "fp64" else "fp32"
    signature = {f"inp{level}": f"*{dtype}" for level in range(multi_scale_kernels.MAX_LEVELS)}
    signature.update({"rois_ptr": f"*{rois}", "levels_ptr": "*i64", "out_ptr": f"*{dtype}",
                      "arg_ptr": "*i32", "log_ptr": "*i64", "N": "i32", "C": "i32", "PH": "i32",
                      "PW": "i32", "s_rk": "i32", "s_rj": "i32"})  # fmt: skip
    for level in range(multi_scale_kernels.MAX_LEVELS):
        for name, kind_of in (("H", "i32"), ("W", "i32"), ("s_n", "i64"), ("s_c", "i32"),
                              ("s_h", "i32"), ("s_w", "i32"), ("sf", "fp32"),
                              ("scale_bits", "i64")):  # fmt: skip
            signature[f"{name}{level}"] = kind_of
    signature["blk_offset"] = "i32"
    constexprs = dict(GEOM_HALF=False, GEOM_F64=dtype == "fp64", ACC_F64=dtype == "fp64",
                      LEVELS=4, NEEDS_ARGMAX=True, REPORT_BAD=False)  # fmt: skip
    constexprs.update(flags)
    if kind == "unit":
        signature["chan_per_prog"] = "i32"
        constexprs.update(LANES=256, CHANNELS=4)
        kernel, warps = multi_scale_kernels.roi_pool_forward_unit_levels, 8
    else:
        element = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}[dtype]
        constexprs.update(BLOCK_C=128 // element, BLOCK_B=64, VEC=16 // element, EVEN_C=True,
                          C_UNIT=True)  # fmt: skip
        kernel, warps = multi_scale_kernels.roi_pool_forward_channels_last_levels, 4
    return _compile(kernel, signature, constexprs, arch, warps)


def _levels_backward(dtype: str, arch: int):
    """The fused multi-level backward scatter, four levels."""
    from roi_ops_triton import multi_scale_kernels

    accumulate = "fp64" if dtype == "fp64" else "fp32"
    rois = "fp64" if dtype == "fp64" else "fp32"
    signature = {"grad_out_ptr": f"*{dtype}", "arg_ptr": "*i32", "rois_ptr": f"*{rois}",
                 "levels_ptr": "*i64"}  # fmt: skip
    signature.update({f"grad{level}": f"*{accumulate}" for level in range(5)})
    signature.update({name: "i32" for name in ("N", "C", "PH", "PW", "s_k", "s_c", "s_h", "s_w",
                                               "s_rk")})  # fmt: skip
    for level in range(multi_scale_kernels.MAX_LEVELS):
        signature.update({f"s_gn{level}": "i32", f"s_gc{level}": "i32", f"s_gi{level}": "i32"})
    signature["blk_offset"] = "i32"
    constexprs = {"ROIS_F64": rois == "fp64", "ACC_F64": dtype == "fp64", "BLOCK": 1024,
                  "LEVELS": 4}  # fmt: skip
    return _compile(
        multi_scale_kernels.roi_pool_backward_scatter_levels, signature, constexprs, arch
    )


def _backward(dtype: str, arch: int, channels_last: bool = False):
    from roi_ops_triton import backward

    accumulate = "fp64" if dtype == "fp64" else "fp32"
    rois = "fp64" if dtype == "fp64" else "fp32"
    signature = {
        "grad_out_ptr": f"*{dtype}", "arg_ptr": "*i32", "rois_ptr": f"*{rois}",
        "grad_in_ptr": f"*{accumulate}", "N": "i32", "C": "i32", "HW": "i32", "PH": "i32",
        "PW": "i32", "s_k": "i32", "s_c": "i32", "s_h": "i32", "s_w": "i32", "s_rk": "i32",
        "blk_offset": "i32",
    }  # fmt: skip
    constexprs = {
        "ROIS_F64": rois == "fp64", "ACC_F64": dtype == "fp64", "BLOCK": 1024,
        "CHANNELS_LAST": channels_last,
    }  # fmt: skip
    return _compile(backward.roi_pool_backward_scatter, signature, constexprs, arch)


def _record(arch: int):
    from roi_ops_triton import forward

    signature = {"rois_ptr": "*fp32", "log_ptr": "*i64", "N": "i32", "s_rk": "i32", "s_rj": "i32"}
    return _compile(forward.record_bad_rois, signature, {"GEOM_F64": False}, arch, 1)


def _resources(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return "registers: unknown"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"roi_ops_triton_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True
        ).stdout
    finally:
        path.unlink(missing_ok=True)
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not match:
        return "registers: unknown"
    regs, stack, shared, local = match.groups()
    return f"registers {regs}, stack {stack}, shared {shared}, local (spills) {local}"


def check_ptx(ptx: str, float64_geometry: bool) -> list[str]:
    """Problems with one kernel's PTX (empty when it has the arithmetic the contract needs)."""
    problems = [what for what, pattern in _FORBIDDEN.items() if pattern.search(ptx)]
    if ptx.count("div.rn.f64" if float64_geometry else "div.rn.f32") < 2:
        problems.append("expected two correctly rounded bin-size divisions")
    return problems


def innermost_loops(ptx: str) -> list[list[str]]:
    """The instruction lines of each innermost loop of the PTX, from its header label to the
    branch back to it (LLVM's comments mark innermost loop headers)."""
    lines = ptx.splitlines()
    loops = []
    for index, line in enumerate(lines):
        match = re.match(r"(\$L__BB\d+_\d+):", line)
        if not match:
            continue
        header = index + 1
        while header < len(lines) and lines[header].strip().startswith("//"):
            header += 1
        if not any("Inner Loop Header" in text for text in lines[index:header]):
            continue
        body = []
        for other in lines[header:]:
            code = other.split("//")[0].strip()
            if code and not code.startswith((".loc", "$L__tmp")):
                body.append(code)
            if re.search(rf"bra(\.uni)?\s+{re.escape(match.group(1))};", code):
                break
        loops.append(body)
    return loops


def check_unit_loop(ptx: str, channels: int) -> list[str]:
    """Problems with the unit kernel's scan: its innermost loop (one element of every lane's bin)
    must load `channels` values, clamp the column once for all of them (one ``min.s32``), and
    touch no shared memory. A kernel laid out channels-fastest recomputes the clamp per channel."""
    loops = [loop for loop in innermost_loops(ptx) if any("setp.gtu" in line for line in loop)]
    if len(loops) != 1:
        return [f"expected one innermost loop with comparisons, found {len(loops)}"]
    (loop,) = loops
    loads = sum("ld.global" in line for line in loop)
    clamps = sum(line.startswith("min.s32") for line in loop)
    shared = sum(".shared" in line or "bar.sync" in line for line in loop)
    if (loads, clamps, shared) != (channels, 1, 0):
        return [
            f"the scan loop has {loads} global loads (expected {channels}), {clamps} column "
            f"clamps (expected 1) and {shared} shared-memory operations (expected 0)"
        ]
    return []


def main(argv: list[str] | None = None) -> int:
    """Compile and check every variant; return a process exit status (0 when all pass)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--dump", type=Path, help="write each variant's PTX to this folder")
    args = parser.parse_args(argv)
    if interpreting():
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    failed = False
    kernels = (
        ("roi_pool_forward_flat", _FLAT_DEFAULTS, FLAT_VARIANTS, _FORWARD_RUNTIME, 4),
        ("roi_pool_forward_unit", _UNIT_DEFAULTS, UNIT_VARIANTS, _UNIT_RUNTIME, 8),
        ("roi_pool_forward_channels_last", _CL_DEFAULTS, CL_VARIANTS, _FORWARD_RUNTIME, 4),
    )
    jobs = [
        (name, lambda spec=spec, n=name: _forward(*spec, n, args.arch))
        for spec in kernels
        for name in spec[2]
    ]
    jobs += [(f"backward-{d}", lambda d=d: _backward(d, args.arch)) for d in ("fp32", "bf16")]
    jobs += [("backward-fp64", lambda: _backward("fp64", args.arch))]
    jobs += [("backward-fp32-channels-last", lambda: _backward("fp32", args.arch, True))]
    jobs += [("record-bad-rois", lambda: _record(args.arch))]
    jobs += [
        ("levels-unit-float32", lambda: _levels_forward("unit", "fp32", args.arch)),
        ("levels-unit-float16-inference-report", lambda: _levels_forward(
            "unit", "fp16", args.arch, NEEDS_ARGMAX=False, REPORT_BAD=True)),
        ("levels-unit-float64", lambda: _levels_forward("unit", "fp64", args.arch)),
        ("levels-cl-float32", lambda: _levels_forward("cl", "fp32", args.arch)),
        ("levels-cl-bfloat16-report", lambda: _levels_forward(
            "cl", "bf16", args.arch, REPORT_BAD=True)),
        ("levels-backward-fp32", lambda: _levels_backward("fp32", args.arch)),
        ("levels-backward-fp64", lambda: _levels_backward("fp64", args.arch)),
    ]  # fmt: skip
    for name, build in jobs:
        kernel = build()
        ptx = kernel.asm["ptx"]
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{name}.ptx").write_text(ptx)
        if name.startswith(("backward", "record", "levels-backward")):
            problems = [what for what, pattern in _FORBIDDEN.items() if pattern.search(ptx)]
        else:
            problems = check_ptx(ptx, "float64" in name)
        if name.startswith("unit-"):
            channels = {**_UNIT_DEFAULTS, **UNIT_VARIANTS[name]}["CHANNELS"]
            problems += check_unit_loop(ptx, channels)
        if name.startswith("levels-unit-"):
            problems += check_unit_loop(ptx, 4)
        vector_variant = name.startswith(("cl-", "levels-cl-")) and "unaligned" not in name
        if vector_variant and "ld.global.v" not in ptx:
            problems.append("expected vector loads of aligned channels")
        reports = "report" in name or name.startswith("record")
        if reports != bool(re.search(r"(atom|red)\.[a-z.]*min\.s64", ptx)):
            problems.append("64-bit atomic minimums where, and only where, bad ROIs are reported")
        status = "ok" if not problems else "FAILED: " + "; ".join(problems)
        failed = failed or bool(problems)
        print(f"{name:32s} {_resources(kernel.asm['cubin'])}: {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
