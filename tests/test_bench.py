"""The benchmark harness runs end to end (functional only: no timing assertions)."""

from __future__ import annotations

import json

import pytest

from roi_ops.__main__ import main
from roi_ops.bench.workloads import WORKLOADS, make_rois


def test_rois_are_deterministic_and_inside_the_image():
    import torch

    w = WORKLOADS["fpn-p2"]
    first, second = make_rois(w, torch.float64, "cpu", 3), make_rois(w, torch.float64, "cpu", 3)
    assert (first == second).all()
    assert first[:, 0].min() >= 0 and first[:, 0].max() < w.num_images
    assert first[:, 1].min() >= 0 and first[:, 3].max() <= w.width / w.spatial_scale + 1e-6
    sides = first[:, 3] - first[:, 1]
    assert sides.min() >= w.box_min - 1e-6 and sides.max() <= w.box_max + 1e-6


def test_bench_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.json"
    chart = tmp_path / "chart.png"
    code = main(
        [
            "bench",
            "--workload",
            "fpn-p4",
            "--backend",
            "torch",
            "--budget",
            "0.01",
            "--min-reps",
            "1",
            "--json",
            str(out),
            "--plot",
            str(chart),
        ]
    )
    assert code == 0
    document = json.loads(out.read_text())
    (row,) = document["results"]
    assert row["backend"] == "torch" and set(row["times_ms"]) == {"infer", "fwd", "fwd+bwd"}
    assert all(t > 0 for t in row["times_ms"].values())
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fpn-p4" in capsys.readouterr().out
