"""Choosing a backend: names, suggestions, checks at creation, caching, explain, the debug log."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import TorchKernels, deterministic_algorithms, small_inputs

import roi_ops
from roi_ops.registry import REGISTRY
from roi_ops.testing import registered_backend


class Fake(TorchKernels):
    name = "Fake-Fast"
    priority = 10_000


@pytest.fixture
def fake():
    with registered_backend(Fake()) as backend:
        yield backend


def test_names_ignore_case():
    x, rois = small_inputs()
    expected = roi_ops.roi_pool(x, rois, 2, backend="torch")
    for name in ("TORCH", "Torch", " torch "):
        assert torch.equal(roi_ops.roi_pool(x, rois, 2, backend=name), expected)
    assert torch.equal(roi_ops.roi_pool(x, rois, 2, backend="AUTO"), expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: roi_ops.RoIPool(2, backend="nunba"),
        lambda: roi_ops.use_backend("nunba").__enter__(),
        lambda: roi_ops.roi_pool(*small_inputs(), 2, backend="nunba"),
    ],
    ids=["module", "use_backend", "call"],
)
def test_unknown_names_fail_early_with_the_closest_name(make):
    with pytest.raises(roi_ops.BackendNotFoundError, match=r"'nunba'.*; did you mean 'numba'\?"):
        make()


def test_unknown_name_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("ROI_OPS_BACKEND", "torhc")
    with pytest.raises(roi_ops.BackendNotFoundError, match=r"ROI_OPS_BACKEND.*'torch'"):
        roi_ops.roi_pool(*small_inputs(), 2)


def test_a_cuda_backend_on_cpu_tensors_says_to_move_them():
    x, rois = small_inputs(torch.float32)
    with pytest.raises(roi_ops.BackendUnavailableError) as error:
        roi_ops.roi_pool(x, rois, 2, backend="cupy")
    assert "To fix: 'cupy' runs on cuda tensors: move input and rois there" in str(error.value)


def test_registering_a_backend_takes_effect_at_once():
    x, rois = small_inputs()
    assert roi_ops.explain(x, rois, 2).backend != "Fake-Fast"
    roi_ops.roi_pool(x, rois, 2)  # cached choice
    with registered_backend(Fake()):
        assert roi_ops.explain(x, rois, 2).backend == "Fake-Fast"
        with roi_ops.use_backend("fake-fast"):
            roi_ops.roi_pool(x, rois, 2)
    assert roi_ops.explain(x, rois, 2).backend != "Fake-Fast"


def test_changing_the_environment_takes_effect_at_once(monkeypatch):
    x, rois = small_inputs()
    monkeypatch.setenv("ROI_OPS_BACKEND", "torch")
    assert roi_ops.explain(x, rois, 2).backend == "torch"
    monkeypatch.setenv("ROI_OPS_BACKEND", "numba")
    assert roi_ops.explain(x, rois, 2).backend == "numba"


def test_explain_reports_the_choice_and_every_reason(fake):
    x, rois = small_inputs()
    explanation = roi_ops.explain(x, rois, 2)
    assert explanation.backend == "Fake-Fast"
    assert explanation.request == "auto" and explanation.source == "the default"
    text = str(explanation)
    assert text.startswith("backend: Fake-Fast")
    assert "Fake-Fast (priority 10000): usable" in text
    assert "invalid rows raise at the call" in text
    float32 = roi_ops.explain(x.float(), rois.float(), 2, backend="Fake-Fast")
    assert float32.backend is None and "dtype float32 not supported" in str(float32)


def test_nondeterministic_forward_is_not_chosen_in_deterministic_mode(fake, monkeypatch):
    monkeypatch.setattr(Fake, "deterministic", False)
    x, rois = small_inputs()
    with deterministic_algorithms():
        explanation = roi_ops.explain(x, rois, 2)
        with pytest.raises(roi_ops.BackendUnavailableError, match="forward is not determin"):
            roi_ops.roi_pool(x, rois, 2, backend="fake-fast")
    assert explanation.backend != "Fake-Fast"
    assert "its forward is not deterministic" in str(explanation)
    assert roi_ops.explain(x, rois, 2).backend == "Fake-Fast"


def test_debug_log_shows_every_choice(fake, caplog):
    x, rois = small_inputs()
    with caplog.at_level(logging.DEBUG, logger="roi_ops.dispatch"):
        roi_ops.roi_pool(x, rois, 2)
    assert any("-> 'Fake-Fast'" in record.getMessage() for record in caplog.records)


def test_info_lists_capabilities(capsys):
    from roi_ops.__main__ import main

    main(["info"])
    out = capsys.readouterr().out
    assert "torch" in out and "cpu: " in out and "numba" in out


def test_registry_version_changes_with_the_set_of_backends(fake):
    version = REGISTRY.version
    roi_ops.unregister_backend("Fake-Fast")
    assert REGISTRY.version > version
    roi_ops.register_backend(Fake())
