"""Soak: many roi_pool calls with varying shapes; memory must stay flat, kernels not recompile.

    python scripts/soak.py --device cuda --backend cupy triton --calls 10000

For each backend: warms up (every dtype and model), then counts compiled kernel variants,
process RSS and (on CUDA) allocated memory before and after `--calls` forward+backward calls
with random K, N, H and W. Exits non-zero if a count or the memory grows.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch

import roi_ops


def compiled_variants(backend: str) -> int:
    """Kernel specialisations compiled so far by `backend` (best effort per backend)."""
    if backend == "cupy":
        from roi_ops_cupy import launch

        return len(launch._kernels)
    if backend == "triton":
        from roi_ops_triton import backward, forward

        total = 0
        for value in [*vars(forward).values(), *vars(backward).values()]:
            cache = getattr(value, "device_caches", None) or getattr(value, "cache", None)
            if isinstance(cache, dict):
                for per_device in cache.values():
                    entries = per_device[0] if isinstance(per_device, tuple) else per_device
                    total += len(entries) if hasattr(entries, "__len__") else 0
        return total
    if backend == "numba":
        from roi_ops_numba import geometry, pool_groups, pool_keys, scatter, staging

        modules = (geometry, pool_groups, pool_keys, scatter, staging)
        return sum(len(getattr(v, "signatures", ())) for m in modules for v in vars(m).values())
    return 0


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


MODELS = ((256, 7), (64, 14))  # (channels, output size): fixed per model, as in training


def one_call(backend: str, device: str, g: torch.Generator, index: int, models=MODELS) -> None:
    """One forward+backward with random K, N, H, W (what detection varies between steps)."""
    dtype = (torch.float32, torch.float16, torch.bfloat16, torch.float64)[index % 4]
    channels, out = models[(index // 4) % len(models)]
    n = int(torch.randint(1, 5, (), generator=g))
    h, w = (int(v) for v in torch.randint(4, 80, (2,), generator=g))
    k = int(torch.randint(0, 300, (), generator=g))
    x = torch.randn(n, channels, h, w, generator=g).to(dtype).to(device).requires_grad_(True)
    boxes = torch.rand(k, 4, generator=g) * torch.tensor([w, h, w, h]) * 8
    boxes[:, 2:] += boxes[:, :2]
    batch = torch.randint(0, n, (k, 1), generator=g).float()
    rois = torch.cat([batch, boxes], 1).to(torch.float32 if dtype == torch.bfloat16 else dtype)
    pooled = roi_ops.roi_pool(x, rois.to(device), out, 1 / 8, backend=backend)
    pooled.sum().backward()


def _snapshot(backend: str, device: str) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
    state = {"rss_mib": round(rss_mib(), 1), "compiled": compiled_variants(backend)}
    if device == "cuda":
        state["cuda_allocated_mib"] = torch.cuda.memory_allocated() / 2**20
    return state


def soak(backend: str, device: str, calls: int, warmup: int = 400, models=MODELS) -> dict:
    """Warm up, then `calls` calls; memory and compiled-kernel counts before, during, after."""
    g = torch.Generator().manual_seed(0)
    checkpoints = []
    with roi_ops.value_checks(False):
        for i in range(warmup):
            one_call(backend, device, g, i, models)
        before = _snapshot(backend, device)
        for i in range(calls):
            one_call(backend, device, g, i, models)
            if (i + 1) % max(1, calls // 4) == 0:
                checkpoints.append(_snapshot(backend, device)["compiled"])
    after = _snapshot(backend, device)
    ok = after["compiled"] == before["compiled"] and after["rss_mib"] < before["rss_mib"] + 64
    if device == "cuda":
        ok &= after["cuda_allocated_mib"] <= before["cuda_allocated_mib"] + 1
    return {
        "backend": backend,
        "device": device,
        "calls": calls,
        "before": before,
        "after": after,
        "compiled_at_quarters": checkpoints,
        "ok": ok,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", nargs="+", default=["torch"])
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = [soak(b, args.device, args.calls, args.warmup) for b in args.backend]
    for r in results:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
