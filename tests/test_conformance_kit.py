"""The conformance kit itself: it fails (not skips) when the named backend is missing or cannot
load, unless the test class opts in to skipping; failures name the first differing element; the
bad-ROI log check catches a backend that records the wrong row."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import roi_ops
from roi_ops import bad_rois
from roi_ops.testing import check_case, contract_cases
from roi_ops.testing.conformance import bad_roi_cases, check_bad_roi_log
from roi_ops.torch_backend import TorchBackend

PLUGIN_TESTS = textwrap.dedent(
    """
    import pytest
    import roi_ops
    from roi_ops import bad_rois
    from roi_ops.testing import BackendConformance
    from roi_ops.torch_backend import TorchBackend


    class Reporting(TorchBackend):
        name = "kit-reporting"
        priority = -100
        reports_bad_rois = True

        def forward(self, problem, output, argmax):
            if problem.bad_roi_log is not None:
                bad_rois.record_bad_rois(problem.bad_roi_log, problem.rois, problem.input.shape[0])
            super().forward(problem, output, argmax)


    roi_ops.register_backend(Reporting)


    class TestMisspelled(BackendConformance):
        @pytest.fixture
        def backend_name(self):
            return "nunba"


    class TestPluginThatFailsToImport(BackendConformance):
        @pytest.fixture
        def backend_name(self):
            return "kit-broken"


    class TestOptionalBackend(BackendConformance):
        skip_unavailable = True

        @pytest.fixture
        def backend_name(self):
            return "kit-not-installed"


    class TestReporting(BackendConformance):
        @pytest.fixture
        def backend_name(self):
            return "kit-reporting"
    """
)


def _broken_plugin(folder) -> None:
    """A distribution on sys.path whose roi_ops.backends entry point names a missing module."""
    info = folder / "kit_broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kit-broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[roi_ops.backends]\nkit-broken = kit_no_such_module:Backend\n"
    )


def test_missing_or_broken_backends_fail_unless_the_class_opts_in_to_skipping(tmp_path):
    _broken_plugin(tmp_path)
    test_file = tmp_path / "test_plugin.py"
    test_file.write_text(PLUGIN_TESTS)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(test_file),
         "-k", "test_deterministic_backward or test_bad_roi_log"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    summary = [line for line in out.splitlines() if line.split(" ")[0] in {"PASSED", "ERROR",
               "FAILED", "SKIPPED"}]  # fmt: skip

    def outcomes(cls: str) -> set[str]:
        return {line.split(" ")[0] for line in summary if f"::{cls}::" in line}

    assert outcomes("TestMisspelled") == {"ERROR"}, out
    assert "backend 'nunba' is not registered; did you mean 'numba'?" in out
    assert outcomes("TestPluginThatFailsToImport") == {"ERROR"}, out
    assert "backend 'kit-broken' cannot run in this process: failed to load" in out
    assert "kit_no_such_module" in out
    skipped = [line for line in summary if line.startswith("SKIPPED")]
    assert skipped and all("backend 'kit-not-installed' is not registered" in s for s in skipped)
    assert "5 skipped" in out, out
    # The reporting backend passes the log check in every dtype (and the determinism test).
    passed = [line for line in summary if line.startswith("PASSED") and "TestReporting" in line]
    assert len(passed) == 5, out


class _OneWrongElement(TorchBackend):
    """The torch backend with one output element, argmax entry or gradient element off."""

    name = "kit-wrong"
    priority = -100
    wrong = "output"

    def forward(self, problem, output, argmax):
        super().forward(problem, output, argmax)
        if problem.num_rois and self.wrong == "output":
            output[1, 0, 1, 0] += 1
        if problem.num_rois and self.wrong == "argmax" and argmax is not None:
            argmax[1, 0, 0, 1] = 0

    def backward(self, problem):
        if self.wrong != "gradient":
            return None
        grad = torch.zeros(problem.input_shape, dtype=problem.input_dtype)
        grad.index_put_(
            (torch.tensor([0]), torch.tensor([0]), torch.tensor([2]), torch.tensor([3])),
            torch.tensor([9.0], dtype=problem.input_dtype),
        )
        return grad


@pytest.fixture
def wrong_backend():
    backend = roi_ops.register_backend(_OneWrongElement)
    yield backend
    roi_ops.unregister_backend("kit-wrong")


@pytest.mark.parametrize(
    ("wrong", "message"),
    [
        ("output", r"output differs from the reference: first difference at \[k=1, c=0, ph=1, "
                   r"pw=0\]: got .+, expected .+ \(1 of \d+ elements differ\)"),
        ("argmax", r"argmax differs from the reference: first difference at \[k=1, c=0, ph=0, "
                   r"pw=1\]: got 0, expected -?\d+"),
        ("gradient", r"gradient \(input.grad\) differs from the reference: first difference at "
                     r"\[n=0, c=0, h=\d+, w=\d+\]: got .+, expected .+"),
    ],
)  # fmt: skip
def test_failures_name_the_first_differing_element(wrong_backend, wrong, message):
    wrong_backend.wrong = wrong
    case = contract_cases("cpu", torch.float32)[0]
    with pytest.raises(AssertionError, match=message):
        check_case(case, "kit-wrong")


class _LogsTheLastBadRow(TorchBackend):
    name = "kit-last-row"
    reports_bad_rois = True

    def forward(self, problem, output, argmax):
        bad = bad_rois.invalid_rows(problem.rois, problem.input.shape[0]).nonzero().flatten()
        if problem.bad_roi_log is not None and bad.numel():
            last = int(bad[-1])
            bad_rois.record_bad_rois(
                problem.bad_roi_log, problem.rois[last:], problem.input.shape[0]
            )
        super().forward(problem, output, argmax)


def test_bad_roi_log_check_catches_the_wrong_row():
    backend = _LogsTheLastBadRow()
    case = next(
        c for c in bad_roi_cases(torch.device("cpu"), torch.float32) if "nan-coord" in c.name
    )
    with pytest.raises(AssertionError, match="bad-ROI log decodes to BadRoi"):
        check_bad_roi_log(backend, case, bad_rois.new_log(), needs_argmax=True)


def test_bad_roi_cases_cover_each_invalid_kind():
    cases = bad_roi_cases(torch.device("cpu"), torch.float16)
    names = [c.name for c in cases]
    assert "bad-roi-none" in names and "invalid-and-huge" in names
    for case in cases:
        expected = bad_rois.new_log()
        bad_rois.record_bad_rois(expected, case.rois_tensor(), case.input.shape[0])
        assert (bad_rois.decode(expected) is None) == (case.name == "bad-roi-none")
