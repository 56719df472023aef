"""Benchmark harness behind ``python -m roi_ops bench``."""

from .runner import format_table, run_benchmark, to_json
from .workloads import SMALL_PROBLEM, WORKLOADS, Workload, make_input, make_rois, resolve_workloads

__all__ = [
    "SMALL_PROBLEM",
    "WORKLOADS",
    "Workload",
    "format_table",
    "make_input",
    "make_rois",
    "resolve_workloads",
    "run_benchmark",
    "to_json",
]
