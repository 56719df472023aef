"""roi_pool under DistributedDataParallel: two gloo ranks on CPU equal one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_roi_head.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_ranks_match_a_single_process(tmp_path):
    report = tmp_path / "report.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--standalone",
        str(EXAMPLE),
        "--dist-backend",
        "gloo",
        "--steps",
        "3",
        "--report",
        str(report),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(report.read_text())
    assert result["world"] == 2 and len(result["steps"]) == 3
    for step in result["steps"]:
        assert step["match"], step
        assert step["max_grad_diff"] <= 1e-5
