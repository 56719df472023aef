"""Benchmark harness behind ``python -m roi_ops bench``."""

from .runner import format_table, run_benchmark, to_json
from .workloads import WORKLOADS, Workload, make_input, make_rois

__all__ = [
    "WORKLOADS",
    "Workload",
    "format_table",
    "make_input",
    "make_rois",
    "run_benchmark",
    "to_json",
]
