"""`python -m roi_ops`: every user mistake ends in one readable message and a non-zero exit status,
checked before any timing starts; no tracebacks. Runs `main([...])` in-process (fast)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import roi_ops
from roi_ops import __main__ as cli
from roi_ops.bench import runner
from roi_ops.bench.workloads import WORKLOADS, Workload

TINY = Workload("tiny", 1, 4, 8, 8, 4, 2, 1 / 4, 4, 16)


@pytest.fixture
def no_timing(monkeypatch):
    """Fail the test if a bench command gets as far as timing anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("timing started before the arguments were checked")

    monkeypatch.setattr(runner, "copy_bandwidth", refuse)
    monkeypatch.setattr(runner, "time_calls", refuse)


@pytest.fixture
def tiny(monkeypatch):
    """A tiny workload and no copy-bandwidth measurement, so a real bench run takes a moment."""
    monkeypatch.setitem(WORKLOADS, "tiny", TINY)
    monkeypatch.setattr(runner, "copy_bandwidth", lambda device, budget: 1e10)
    monkeypatch.setattr(runner, "SMALL_PROBLEM", TINY)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def error_line(err: str) -> str:
    (line,) = [x for x in err.splitlines() if "error:" in x]
    return line


# bench: bad arguments -----------------------------------------------------------------------


def test_unknown_workload_suggests_the_closest(capsys, no_timing):
    code, _, err = run(capsys, "bench", "--workload", "frcnn-c5")
    assert code == 2
    line = error_line(err)
    assert "unknown workload 'frcnn-c5'" in line and "did you mean 'frcnn-c4'?" in line
    assert "many-small" in line  # lists the known names


def test_unknown_backend_suggests_the_closest(capsys, no_timing):
    code, _, err = run(capsys, "bench", "--backend", "nunba")
    assert code == 2
    line = error_line(err)
    assert "unknown backend 'nunba'" in line and "did you mean 'numba'?" in line


def test_backend_names_ignore_case(capsys, tiny):
    code, out, _ = run(
        capsys, "bench", "--workload", "tiny", "--backend", "TORCH", "--mode", "infer",
        "--budget", "0.001", "--min-reps", "1", "--no-host-time",
    )  # fmt: skip
    assert code == 0 and "\ntiny       float32   torch " in out


def test_torchvision_missing(capsys, monkeypatch, no_timing):
    monkeypatch.setattr(runner, "torchvision_roi_pool", lambda: None)
    code, _, err = run(capsys, "bench", "--backend", "torch", "torchvision")
    assert code == 2
    assert "torchvision cannot be imported here" in error_line(err)


class _CudaOnly(roi_ops.Backend):
    name = "cuda-only-test"
    device_types = frozenset({"cuda"})

    def forward(self, problem, output, argmax):
        raise AssertionError("never called")


def test_backend_that_cannot_run_on_the_device(capsys, no_timing):
    roi_ops.register_backend(_CudaOnly)
    try:
        code, _, err = run(capsys, "bench", "--device", "cpu", "--backend", "cuda-only-test")
    finally:
        roi_ops.unregister_backend("cuda-only-test")
    assert code == 2
    line = error_line(err)
    assert "--backend cuda-only-test: cannot run on cpu" in line
    assert "device type 'cpu' not supported" in line and "--device cuda" in line


def test_cuda_without_cuda(capsys, monkeypatch, no_timing):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "bench", "--device", "cuda")
    assert code == 2
    line = error_line(err)
    assert "--device cuda: CUDA is not available here" in line and "--device cpu" in line


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:x"])
def test_device_that_is_not_cpu_or_cuda(capsys, no_timing, device):
    code, _, err = run(capsys, "bench", "--device", device)
    assert code == 2
    assert "--device" in error_line(err) and "expected 'cpu' or 'cuda[:INDEX]'" in err


def test_plot_without_matplotlib_fails_before_timing(capsys, monkeypatch, no_timing, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    code, _, err = run(capsys, "bench", "--plot", str(tmp_path / "chart.png"))
    assert code == 2
    line = error_line(err)
    assert "--plot: charts need matplotlib" in line and "pip install matplotlib" in line
    code, _, err = run(capsys, "plot", "in.json", str(tmp_path / "chart.png"))
    assert code == 2 and "charts need matplotlib" in error_line(err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--queue", "0"], "--queue: expected --queue >= 1, got 0"),
        (["--queue", "many"], "--queue: expected an integer, got 'many'"),
        (["--threads", "-1"], "--threads: expected --threads >= 0"),
        (["--budget", "-0.5"], "--budget: expected --budget >= 0.0"),
        (["--min-reps", "0"], "--min-reps: expected --min-reps >= 1"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--mode", "backward"], "invalid choice: 'backward'"),
        (["--sync", "--queue", "5"], "--sync and --queue: give one"),
        (["--json", "/no/such/folder/out.json"], "the folder '/no/such/folder' does not exist"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_options(capsys, no_timing, argv, message):
    code, _, err = run(capsys, "bench", *argv)
    assert code == 2
    assert message in err


def test_no_command(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "required: COMMAND" in err


# bench: what runs ---------------------------------------------------------------------------


def _progress_counts(err: str) -> list[tuple[int, int]]:
    counts = []
    for line in err.replace("\r", "\n").splitlines():
        if line.startswith("[") and "] " in line:
            done, total = line.split("] ", 1)[1].split(" ", 1)[0].split("/")
            counts.append((int(done), int(total)))
    return counts


def test_progress_counts_runnable_backends_and_selected_modes(capsys, tiny):
    roi_ops.register_backend(_CudaOnly)  # registered, but never counted on the CPU
    try:
        code, out, err = run(
            capsys, "bench", "--workload", "tiny", "--mode", "infer", "fwd", "--budget", "0.001",
            "--min-reps", "1", "--dtype", "float32", "float64",
        )  # fmt: skip
    finally:
        roi_ops.unregister_backend("cuda-only-test")
    assert code == 0
    backends = runner.usable_backends(torch.device("cpu"), torch.float32, None)
    host = runner.host_rows(backends, named=False, checks_off=False)
    expected = 2 * len(backends) * 2 + len(host) * 2  # two dtypes, two modes
    counts = _progress_counts(err)
    assert counts[-1] == (expected, expected)
    assert all(total == expected for _, total in counts)
    assert "cuda-only-test" not in out


def test_one_chart_per_dtype_with_distinct_names(capsys, tiny, tmp_path):
    pytest.importorskip("matplotlib")
    chart = tmp_path / "chart.png"
    code, out, _ = run(
        capsys, "bench", "--workload", "tiny", "--backend", "torch", "numba", "--mode", "fwd",
        "--budget", "0.001", "--min-reps", "1", "--no-host-time", "--dtype", "float32",
        "float64", "--plot", str(chart),
    )  # fmt: skip
    assert code == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["chart-float32.png", "chart-float64.png"]
    assert f"wrote {tmp_path / 'chart-float32.png'}" in out


def test_chart_paths():
    assert cli.chart_paths("a/c.png", ["float32"]) == {"float32": cli.Path("a/c.png")}
    paths = cli.chart_paths("a/c.png", ["float32", "float16"])
    assert paths == {"float32": cli.Path("a/c-float32.png"), "float16": cli.Path("a/c-float16.png")}
    assert cli.chart_paths("chart", ["float32", "float16"])["float16"] == cli.Path(
        "chart-float16.png"
    )


def test_help_describes_every_option_with_its_default(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)
    for argv in (["--help"], ["bench", "--help"], ["plot", "--help"], ["info", "--help"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0
    code, out, _ = run(capsys, "bench", "--help")
    for default in ("(default: cpu)", "(default: float32)", "(default: 10", "(default: 3)"):
        assert default in out
    assert "as a training loop issues them" in " ".join(out.split())


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"roi_ops {roi_ops.__version__} (torch {torch.__version__})"


# info ---------------------------------------------------------------------------------------


def test_info_flags_an_unknown_backend_setting(capsys, monkeypatch):
    monkeypatch.setenv("ROI_OPS_BACKEND", "cuda")
    code, out, _ = run(capsys, "info")
    assert code == 1
    assert "selection: 'cuda' (from the ROI_OPS_BACKEND environment variable)" in out
    assert "PROBLEM: 'cuda' is not a backend name" in out and "unset ROI_OPS_BACKEND" in out
    assert "what plain auto would pick:" in out
    assert "backend    avail" in out  # the backend table is still there


def test_info_flags_a_backend_that_cannot_run_here(capsys, monkeypatch):
    roi_ops.register_backend(_CudaOnly)
    monkeypatch.setenv("ROI_OPS_BACKEND", "cuda-only-test")
    try:
        code, out, _ = run(capsys, "info")
    finally:
        roi_ops.unregister_backend("cuda-only-test")
    if torch.cuda.is_available():
        assert code == 0  # usable on the GPU
    else:
        assert code == 1 and "cannot run on any device and dtype of this machine" in out
    assert "cpu: every dtype: error: nothing usable (cuda-only-test: device type 'cpu'" in out


def test_info_default(capsys, monkeypatch):
    monkeypatch.delenv("ROI_OPS_BACKEND", raising=False)
    code, out, _ = run(capsys, "info")
    assert code == 0 and "selection: 'auto' (from the default)" in out and "PROBLEM" not in out


def test_info_as_a_program_never_shows_a_traceback():
    env = {**os.environ, "ROI_OPS_BACKEND": "cuda"}
    done = subprocess.run(
        [sys.executable, "-m", "roi_ops", "info"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "PROBLEM: 'cuda' is not a backend name" in done.stdout


# plot ---------------------------------------------------------------------------------------


def test_plot_bad_inputs(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = str(tmp_path / "c.png")
    code, _, err = run(capsys, "plot", str(tmp_path / "missing.json"), png)
    assert code == 2 and "cannot read" in error_line(err) and "missing.json" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "plot", str(bad), png)
    assert code == 2 and "is not JSON" in error_line(err)
    bad.write_text('{"rows": []}')
    code, _, err = run(capsys, "plot", str(bad), png)
    assert code == 2 and "has no 'results' list" in error_line(err)
    good = os.path.join(os.path.dirname(__file__), "data", "sample-h200-bench.json")
    code, _, err = run(capsys, "plot", good, png, "--dtype", "float64")
    assert code == 2
    assert "no measurement of 'float64' (it has: float32, float16)" in error_line(err)
