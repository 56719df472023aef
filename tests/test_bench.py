"""The benchmark harness runs end to end (functional only: no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import roi_ops
from roi_ops.__main__ import main
from roi_ops.bench import runner
from roi_ops.bench.runner import Measurement, Timing, format_table
from roi_ops.bench.workloads import WORKLOADS, Workload, make_rois
from roi_ops.torch_backend import TorchBackend

TINY = Workload("tiny", 2, 4, 8, 8, 6, 2, 1 / 4, 4, 16)
SAMPLES = Path(__file__).resolve().parent / "data"  # bench JSON written by real runs
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(WORKLOADS, "tiny", TINY)
    monkeypatch.setattr(runner, "copy_bandwidth", lambda device, budget: 1e10)
    monkeypatch.setattr(runner, "SMALL_PROBLEM", TINY)


class _Spy(TorchBackend):
    """The torch backend, recording whether value checks were on for each call."""

    name = "spy-test"
    priority = -100
    seen: list[bool] = []

    def forward(self, problem, output, argmax):
        _Spy.seen.append(roi_ops.value_checks_enabled())
        super().forward(problem, output, argmax)


@pytest.fixture
def spy():
    _Spy.seen = []
    roi_ops.register_backend(_Spy)
    yield _Spy
    roi_ops.unregister_backend("spy-test")


def test_rois_are_deterministic_and_inside_the_image():
    w = WORKLOADS["fpn-p2"]
    first, second = make_rois(w, torch.float64, "cpu", 3), make_rois(w, torch.float64, "cpu", 3)
    assert (first == second).all()
    assert first[:, 0].min() >= 0 and first[:, 0].max() < w.num_images
    assert first[:, 1].min() >= 0 and first[:, 3].max() <= w.width / w.spatial_scale + 1e-6
    sides = first[:, 3] - first[:, 1]
    assert sides.min() >= w.box_min - 1e-6 and sides.max() <= w.box_max + 1e-6


def test_workloads_include_wsddn_and_many_small():
    assert {"wsddn", "many-small"} <= set(WORKLOADS)
    for w in WORKLOADS.values():
        small = w.scaled_for_cpu()
        assert small.num_rois <= w.num_rois and small.channels <= w.channels


def test_default_settings_are_timed_and_checks_off_is_labelled(tiny, spy, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--workload", "tiny", "--backend", "spy-test", "--budget", "0.001",
         "--min-reps", "1", "--checks-off", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    document = json.loads(out.read_text())
    rows = {(r["backend"], r["settings"]): r for r in document["results"]}
    assert set(rows) == {("spy-test", "default"), ("spy-test", "checks off")}
    for row in rows.values():
        assert set(row["times_ms"]) == {"infer", "fwd", "fwd+bwd"}
        assert all(t > 0 for t in row["times_ms"].values())
        for mode, (q1, q3) in row["spread_ms"].items():
            low, high = row["range_ms"][mode]
            assert low <= q1 <= row["times_ms"][mode] <= q3 <= high
    assert True in _Spy.seen and False in _Spy.seen  # default calls had the checks on
    assert "spy-test [checks off]" in printed
    assert "settings: roi_ops defaults (value checks on)" in printed
    host = document["small_problem"]["results"]
    assert [(h["backend"], h["settings"]) for h in host] == [
        ("spy-test", "default"),
        ("spy-test", "checks off"),
    ]
    assert all(v > 0 for h in host for v in h["host_us"].values())
    assert "host time per call, small problem" in printed


def test_settings_changed_through_the_environment_are_named(tiny, tmp_path, capsys, monkeypatch):
    for name in ("ROI_OPS_BACKEND", "ROI_OPS_VALUE_CHECKS", "ROI_OPS_NATIVE", "ROI_OPS_LOG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ROI_OPS_HOST_CACHE_BYTES", "0")
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--workload", "tiny", "--backend", "torch", "--budget", "0.001",
         "--min-reps", "1", "--mode", "fwd", "--no-host-time", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "settings: roi_ops defaults (value checks on), except ROI_OPS_HOST_CACHE_BYTES=0" in (
        printed
    )
    assert json.loads(out.read_text())["environment"] == {"ROI_OPS_HOST_CACHE_BYTES": "0"}


def test_host_rows_default_to_auto_at_defaults_and_checks_off():
    rows = runner.host_rows(["numba", "torch", "torchvision"], named=False, checks_off=False)
    assert rows == [
        ("torchvision", "default"),
        ("auto", "default"),
        ("auto", "checks off"),
        ("numba", "default"),
    ]


def test_timing_summary():
    timing = Timing.of([4.0, 1.0, 3.0, 2.0, 100.0])
    assert (timing.median, timing.low, timing.high, timing.reps) == (3.0, 1.0, 100.0, 5)
    assert timing.q1 == 2.0 and timing.q3 == 4.0 and timing.spread == pytest.approx(2 / 3)
    assert Timing.of([5.0]).spread == 0.0


def test_table_shows_spread_and_warns_when_it_is_large():
    quiet = Measurement("w", "", "cpu", "float32", "numba", "contiguous")
    quiet.record("fwd", Timing.of([1.0, 1.01, 0.99]))
    noisy = Measurement("w", "", "cpu", "float32", "torch", "contiguous")
    noisy.record("fwd", Timing.of([1.0, 3.0, 8.0, 0.5]))
    table = format_table([quiet, noisy])
    lines = table.splitlines()
    assert "1.000 (1%) " in lines[2] and "!" not in lines[2]
    assert "!" in lines[3]
    assert "warning: 1 row(s) marked ! have an interquartile range over 25%" in table


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG


def test_plot_from_a_saved_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    for name in ("sample-h200-bench.json", "sample-cpu-bench.json"):
        chart = tmp_path / f"{name}.png"
        assert main(["plot", str(SAMPLES / name), str(chart), "--dtype", "float32"]) == 0
        assert _png(chart)
    assert main(["plot", str(SAMPLES / "sample-h200-bench.json"), str(tmp_path / "all.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("all-*.png")) == [
        "all-float16.png",
        "all-float32.png",
    ]


def test_plot_skips_a_dtype_without_a_baseline(tmp_path, capsys):
    # torchvision has no bfloat16 kernel: a run with bfloat16 rows charts the other dtypes.
    pytest.importorskip("matplotlib")
    document = json.loads((SAMPLES / "sample-h200-bench.json").read_text())
    bf16 = [
        {**r, "dtype": "bfloat16"} for r in document["results"] if r["backend"] != "torchvision"
    ]
    document["results"] += bf16
    source = tmp_path / "with-bf16.json"
    source.write_text(json.dumps(document))
    assert main(["plot", str(source), str(tmp_path / "all.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("all-*.png")) == [
        "all-float16.png",
        "all-float32.png",
    ]
    assert "no chart for bfloat16: no baseline measured for it" in capsys.readouterr().err


def test_plot_of_a_fresh_run_with_checks_off_rows(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--workload", "tiny", "--backend", "torch", "numba", "--budget", "0.001",
         "--min-reps", "1", "--checks-off", "--no-host-time", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    from roi_ops.bench.plot import plot_results

    document = json.loads(out.read_text())
    chart = plot_results(document, tmp_path / "fresh.png")  # baseline: the torch backend
    assert _png(chart)
    document["results"] = [r for r in document["results"] if r["backend"] == "numba"]
    with pytest.raises(ValueError, match="neither was measured"):
        plot_results(document, tmp_path / "none.png")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("extra", "queue"), [([], 10), (["--sync"], 1), (["--queue", "3"], 3)])
def test_cuda_bench_queues_calls_by_default(tiny, tmp_path, capsys, extra, queue):
    out = tmp_path / "bench.json"
    code = main(
        ["bench", "--device", "cuda", "--workload", "tiny", "--budget", "0.001", "--min-reps",
         "1", "--checks-off", "--json", str(out), *extra]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    document = json.loads(out.read_text())
    assert document["queue"] == queue and document["device"] == "cuda"
    assert ("calls queued per sample" in printed) == (queue > 1)
    ok = [r for r in document["results"] if not r["error"]]
    assert {r["settings"] for r in ok} == {"default", "checks off"}
    host = {(h["backend"], h["settings"]): h for h in document["small_problem"]["results"]}
    assert ("auto", "default") in host and ("auto", "checks off") in host
    assert host[("auto", "default")]["resolved"] in {"cupy", "triton", "torch"}
    assert all(v > 0 for h in host.values() if not h["error"] for v in h["host_us"].values())


def test_fpn_multi_compares_one_call_with_the_loops(capsys):
    from roi_ops.__main__ import main

    code = main(
        ["bench", "--workload", "fpn-multi", "--budget", "0.01", "--min-reps", "1",
         "--no-host-time", "--mode", "infer"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "roi_ops (one call)" in out and "loop over roi_ops.roi_pool" in out


def test_level_loop_matches_the_one_call():
    from roi_ops.bench.pyramid import FPN_MULTI, level_loop, make_boxes, make_pyramid

    workload = FPN_MULTI.scaled_for_cpu()
    features = make_pyramid(workload, torch.float32, "cpu")
    rois = make_boxes(workload, torch.float32, "cpu")
    scales = workload.spatial_scales
    expected = level_loop(roi_ops.roi_pool, features, rois, 7, scales)
    assert torch.equal(roi_ops.multi_scale_roi_pool(features, rois, 7, scales), expected)
