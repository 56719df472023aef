#!/usr/bin/env bash
# Compile the CuPy backend's kernel source (roi_ops_cupy/cuda/, joined as kernels.source() does)
# with this machine's nvcc for sm_80 and sm_90, every kernel the backend asks NVRTC for
# instantiated (tools/compile_unit.py), all warnings as errors, and the flags the run-time NVRTC
# build uses (--fmad=false, C++17). Prints what it compiled and, for sm_90, the registers, shared
# memory and spills of every kernel. Exits non-zero on any failure.
# --ftz=true: CuPy always adds it to NVRTC builds.
#
# Usage: backends/cupy/tools/check_compile.sh [ARCH...]   (default: 80 90; NVCC=... and
# PYTHON=... to override; roi_ops and roi_ops_cupy must be importable)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cuda_dir="$here/../roi_ops_cupy/cuda"
nvcc="${NVCC:-nvcc}"
python="${PYTHON:-python3}"
archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=(80 90)

if ! command -v "$nvcc" >/dev/null 2>&1; then
  echo "check_compile: nvcc not found (set NVCC or put it on PATH)" >&2
  exit 2
fi
# NVRTC gets no include path from roi_ops_cupy: the source must stay self-contained.
if grep -nE '^[[:space:]]*#[[:space:]]*include' "$cuda_dir"/*; then
  echo "check_compile: roi_ops_cupy/cuda/ must not #include anything (NVRTC has no include path)" >&2
  exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
source_file="$work/roi_ops_kernels.cu"
PYTHONPATH="$here/../${PYTHONPATH:+:$PYTHONPATH}" "$python" "$here/compile_unit.py" "$source_file"
echo "check_compile: $("$nvcc" --version | tail -n 1)"
for arch in "${archs[@]}"; do
  flags=(-std=c++17 --fmad=false --ftz=true -Werror all-warnings
         -Xcompiler -Wall -Xptxas -warn-spills,-warn-lmem-usage
         -gencode "arch=compute_${arch},code=sm_${arch}" -x cu -c "$source_file"
         -o "$work/roi_pool_sm${arch}.o")
  [ "$arch" = 90 ] && flags+=(-Xptxas -v)
  echo "check_compile: nvcc ${flags[*]}"
  "$nvcc" "${flags[@]}" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
  if [ "$arch" = 90 ]; then
    "$python" - "$work/log" <<'PY'
import re, subprocess, sys

# ptxas -v prints, per kernel: "Compiling entry function '<mangled>'", then a line with its
# stack frame and spills, then one with "Used N registers ... smem".
name, spills = None, ""
for line in open(sys.argv[1]).read().splitlines():
    entry = re.search(r"Compiling entry function '([^']+)'", line)
    if entry:
        demangled = subprocess.run(["c++filt", entry.group(1)], capture_output=True, text=True)
        name = re.sub(r"\(.*", "", demangled.stdout.strip()) or entry.group(1)
        continue
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
    if frame:
        spills = f"{frame.group(2)} B spill stores, {frame.group(3)} B spill loads"
        continue
    used = re.search(r"Used (\d+) registers", line)
    if used and name:
        smem = re.search(r"(\d+) bytes smem", line)
        print(f"  sm_90 {name}: {used.group(1)} registers, "
              f"{smem.group(1) if smem else 0} B static smem, {spills}")
        name, spills = None, ""
PY
  fi
  echo "check_compile: sm_${arch} ok"
done
echo "check_compile: all ok (${archs[*]})"
