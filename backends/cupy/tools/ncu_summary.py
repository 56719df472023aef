"""Condense an `ncu --csv --metrics ...` log into one line per kernel launch (tuning aid)."""

from __future__ import annotations

import csv
import io
import re
import sys

SHORT = {
    "gpu__time_duration.sum": "us",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm%",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue%",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occ%",
    "smsp__inst_executed.sum": "Minst",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram%",
    "dram__bytes_read.sum": "dramRdMB",
    "dram__bytes_write.sum": "dramWrMB",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed": "l2%",
    "lts__t_sectors_srcunit_tex_op_read.sum": "l2RdMsec",
    "l1tex__throughput.avg.pct_of_peak_sustained_active": "l1%",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum": "ldMreq",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum": "ldMsec",
    "l1tex__t_sector_hit_rate.pct": "l1hit%",
    "l1tex__data_pipe_lsu_wavefronts_mem_shared.sum": "smemMwf",
    "smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio": "stallLS",
    "smsp__average_warp_latency_issue_stalled_lg_throttle.ratio": "stallLG",
    "smsp__average_warp_latency_issue_stalled_barrier.ratio": "stallBar",
    "smsp__average_warp_latency_issue_stalled_short_scoreboard.ratio": "stallSS",
    "smsp__average_warp_latency_issue_stalled_mio_throttle.ratio": "stallMIO",
    "smsp__average_warp_latency_issue_stalled_wait.ratio": "stallWait",
    "smsp__average_warp_latency_issue_stalled_not_selected.ratio": "stallNS",
    "smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio": "stallMath",
    "smsp__average_warp_latency_issue_stalled_drain.ratio": "stallDrain",
    "smsp__average_warp_latency_issue_stalled_no_instruction.ratio": "stallNoI",
    "smsp__thread_inst_executed_per_inst_executed.ratio": "lanes",
    "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio": "LSperIssue",
}


def to_number(text: str, unit: str) -> float:
    value = float(text.replace(",", ""))
    scale = {
        "nsecond": 1e-3,
        "ns": 1e-3,
        "usecond": 1,
        "us": 1,
        "msecond": 1e3,
        "ms": 1e3,
        "byte": 1e-6,
        "Kbyte": 1e-3,
        "Mbyte": 1,
        "Gbyte": 1e3,
    }.get(unit, 1)
    return value * scale


def main(path: str) -> None:
    text = open(path, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        print(text[-3000:])
        return
    launches: dict[str, dict[str, float]] = {}
    names: dict[str, str] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        key = row["ID"]
        names[key] = re.sub(r"\(.*", "", row["Kernel Name"])[:48]
        metric = row["Metric Name"]
        if metric in SHORT:
            value = to_number(row["Metric Value"], row["Metric Unit"])
            if SHORT[metric] in ("Minst", "ldMreq", "ldMsec", "l2RdMsec", "smemMwf"):
                value /= 1e6
            launches.setdefault(key, {})[SHORT[metric]] = value
    cols = list(SHORT.values())
    print(f"{'kernel':48s} " + " ".join(f"{c:>8s}" for c in cols))
    for key, metrics in launches.items():
        print(f"{names[key]:48s} " + " ".join(f"{metrics.get(c, float('nan')):8.2f}" for c in cols))


if __name__ == "__main__":
    main(sys.argv[1])
