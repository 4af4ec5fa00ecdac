"""The OEFPredictor panel on real Qt (PySide6, offscreen) with a real MRML scene (slicer-core).

The Slicer application is not available in CI, so Slicer's own widget classes are replaced by the
smallest honest stand-ins of Testing/qt_standins.py (listed there). Here also
qt.QFileDialog.getSaveFileName (only in the ROI statistics test) returns a chosen path instead of
opening a modal dialog, which nobody can answer offscreen.

Everything else is real: the .ui file, QUiLoader, the widget code, the Logic, the MRML scene, the
prediction engine (a tiny untrained LSTM) and its background thread, polled by a real QTimer.
Run as a script to render the panel: python Testing/test_slicer_widget.py --screenshot PNG
"""
from __future__ import annotations

import os
import re
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest.importorskip("PySide6")
slicer = pytest.importorskip("slicer")
from PySide6 import QtCore, QtWidgets  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
UI_FILE = REPO / "Resources" / "UI" / "OEFPredictor.ui"
MODULE_FILE = REPO / "OEFPredictor" / "OEFPredictor.py"
sys.path.insert(0, str(REPO / "OEFPredictor"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from qt_standins import child_widget_variables, dispose, load_ui, qt_shim, spin_until  # noqa: E402


def make_panel(monkeypatch=None):
    """The real OEFPredictorWidget, set up on the stand-ins; returns (module, widget)."""
    import OEFPredictor as module
    from OEFPredictorSlicer import compat

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    app.setStyle("Fusion")
    qt = qt_shim()
    setters = [(module, "qt", qt), (compat, "qt", qt), (slicer.util, "loadUI", load_ui),
               (slicer.util, "childWidgetVariables", child_widget_variables)]
    for obj, name, value in setters:
        if monkeypatch is not None:
            monkeypatch.setattr(obj, name, value, raising=False)
        else:
            setattr(obj, name, value)
    widget = module.OEFPredictorWidget()
    widget.setup()
    return module, widget


# --- Tests ---------------------------------------------------------------------------------------
@pytest.fixture()
def panel(monkeypatch):
    from slicer_testing import slicer_scene

    env = slicer_scene()
    module, widget = make_panel(monkeypatch)
    yield types.SimpleNamespace(env=env, module=module, widget=widget, ui=widget.ui)
    dispose(widget)


def test_ui_loads_and_has_every_widget_the_code_uses(panel):
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    used |= set(panel.module.OUTPUT_SELECTORS.values())  # reached by getattr
    missing = sorted(name for name in used if not hasattr(panel.ui, name))
    assert not missing, f"widgets used by OEFPredictor.py but absent from the .ui: {missing}"
    assert len(used) > 25


def test_ui_parameter_names_and_scene_connections():
    """Every SlicerParameterName names a field of the parameter node; every node selector gets the
    scene through the .ui's mrmlSceneChanged -> setMRMLScene connections (as in Slicer)."""
    root = ET.parse(UI_FILE).getroot()
    import OEFPredictor as module
    from OEFPredictorLib import maptable

    fields = set(module.PARAMETER_NODE_FIELDS)
    assert {"qsm", "echoSequence", "outputOEF", "opacity"} <= fields
    # one output field per map the panel offers (maptable.MAPS), each bound to its selector
    outputs = {m.panel_field for m in maptable.MAPS.values() if m.panel}
    assert outputs <= fields and len(outputs) == 10
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    assert bound and set(bound.values()) <= fields, set(bound.values()) - fields
    assert outputs <= set(bound.values()), outputs - set(bound.values())  # a new map needs its selector
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") in ("qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox")}
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert selectors and selectors == connected


def _tooltip(ui):
    return ui.applyButton.toolTip()


def test_apply_enabled_only_with_valid_inputs(panel):
    from slicer_testing import add_echo_sequence, add_echo_volumes, demo_case, ijk_to_ras

    ui = panel.ui
    patient, model_path = demo_case()
    assert not ui.applyButton.isEnabled()
    assert "echo" in _tooltip(ui).lower() and "qsm" in _tooltip(ui).lower()

    ui.methodComboBox.setCurrentIndex(list(panel.module.Method).index(panel.module.Method.lstm))  # the tiny LSTM
    seq, _browser = add_echo_sequence(patient)
    ui.echoSequenceSelector.setCurrentNode(seq)
    # echo times filled from the sequence's index values
    assert [float(t) for t in ui.echoTimesLineEdit.text().split(",")] == pytest.approx(patient.protocol.echo_times_ms)
    assert not ui.applyButton.isEnabled() and "QSM" in _tooltip(ui)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    ui.qsmSelector.setCurrentNode(qsm)
    # the bundled model may not be installed in this checkout: use a model file
    ui.modelFileRadioButton.setChecked(True)
    assert not ui.applyButton.isEnabled() and "model file" in _tooltip(ui)
    ui.modelPathLineEdit.setCurrentPath(str(model_path))
    assert ui.applyButton.isEnabled(), _tooltip(ui)
    assert "8 echoes" in ui.modelInfoLabel.text()

    ui.echoTimesLineEdit.setText("4.5, 9.5")
    assert not ui.applyButton.isEnabled() and "8 echo times" in _tooltip(ui)
    ui.echoTimesLineEdit.setText("0.0045, 0.0095")
    assert not ui.applyButton.isEnabled() and "seconds" in _tooltip(ui)
    ui.echoTimesLineEdit.setText(", ".join(f"{t:g}" for t in patient.protocol.echo_times_ms))
    assert ui.applyButton.isEnabled()

    # the voxelwise fits need no model file
    ui.modelPathLineEdit.setCurrentPath("/nonexistent/model.keras")
    assert not ui.applyButton.isEnabled()
    ui.methodComboBox.setCurrentIndex(list(panel.module.Method).index(panel.module.Method.nlls))
    assert ui.applyButton.isEnabled() and not ui.modelPathLineEdit.isEnabled()
    ui.methodComboBox.setCurrentIndex(list(panel.module.Method).index(panel.module.Method.lstm))
    ui.modelPathLineEdit.setCurrentPath(str(model_path))

    # the list of volumes: at least two ticked, and as many echo times
    ui.echoVolumesRadioButton.setChecked(True)
    assert not ui.applyButton.isEnabled() and not ui.echoSequenceSelector.isEnabled()
    echoes = add_echo_volumes(patient)
    for node in echoes[:1]:
        ui.echoVolumesSelector.setCheckState(node, QtCore.Qt.CheckState.Checked)
    assert not ui.applyButton.isEnabled() and "two" in _tooltip(ui)
    for node in echoes[1:]:
        ui.echoVolumesSelector.setCheckState(node, QtCore.Qt.CheckState.Checked)
    assert ui.echoVolumesSelector.checkedNodes() == echoes
    assert ui.applyButton.isEnabled(), _tooltip(ui)


def _ready_panel(panel):
    from slicer_testing import add_echo_sequence, demo_case, ijk_to_ras

    patient, model_path = demo_case()
    seq, _browser = add_echo_sequence(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    panel.ui.echoSequenceSelector.setCurrentNode(seq)
    panel.ui.qsmSelector.setCurrentNode(qsm)
    panel.ui.methodComboBox.setCurrentIndex(list(panel.module.Method).index(panel.module.Method.lstm))
    panel.ui.modelFileRadioButton.setChecked(True)
    panel.ui.modelPathLineEdit.setCurrentPath(str(model_path))
    # the demo case's model file is a tiny LSTM: the panel's method must say so
    panel.ui.methodComboBox.setCurrentIndex(list(panel.module.Method).index(panel.module.Method.lstm))
    panel.ui.deviceComboBox.setCurrentIndex(list(panel.module.Device).index(panel.module.Device.cpu))
    panel.ui.opacitySliderWidget.setValue(0.45)
    assert panel.ui.applyButton.isEnabled(), _tooltip(panel.ui)
    return patient, seq, qsm


def test_run_shows_progress_and_writes_outputs(panel, monkeypatch):
    from slicer_testing import scene_node_ids

    ui, widget = panel.ui, panel.widget
    widget.controller.timer.setInterval(5)
    patient, seq, qsm = _ready_panel(panel)
    seen = []
    ui.progressBar.valueChanged.connect(seen.append)
    ticks = []
    widget.controller.timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    n_before = len(scene_node_ids(panel.env.scene))

    ui.applyButton.click()
    assert ui.applyButton.text() == "Cancel" and ui.applyButton.isEnabled()
    assert ui.progressBar.isVisible() or not widget.parent.isVisible()
    spin_until(lambda: not widget.controller.busy)
    assert widget.lastError is None, widget.lastError
    assert len(ticks) >= 2  # the GUI event loop kept running while the job ran
    assert any(0 < v < 100 for v in seen), seen  # progress moved through intermediate values
    assert ui.progressBar.value() == 100 and ui.applyButton.text() == "Apply"
    assert set(widget.lastOutputs) == {"OEF", "S0", "R2", "Y", "v", "chi_nb", "quality"}
    assert ui.outputQualitySelector.currentNode() is widget.lastOutputs["quality"]
    assert len(scene_node_ids(panel.env.scene)) > n_before
    assert ui.outputOEFSelector.currentNode() is widget.lastOutputs["OEF"]
    composite = panel.env.scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == widget.lastOutputs["OEF"].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.45)
    assert "Done" in ui.statusLabel.text()


def test_cancel_stops_the_run_and_changes_nothing(panel):
    from slicer_testing import scene_node_ids

    ui, widget = panel.ui, panel.widget
    _ready_panel(panel)
    ids = scene_node_ids(panel.env.scene)
    ui.applyButton.click()
    assert ui.applyButton.text() == "Cancel"
    ui.applyButton.click()  # Cancel
    assert "Cancelling" in ui.statusLabel.text()
    spin_until(lambda: not widget.controller.busy)
    assert "Cancelled" in ui.statusLabel.text()
    assert widget.lastOutputs is None and widget.lastError is None
    assert scene_node_ids(panel.env.scene) == ids
    assert ui.applyButton.text() == "Apply" and ui.applyButton.isEnabled()


def test_roi_statistics_section_calls_the_logic(panel, monkeypatch, tmp_path):
    """The "ROI statistics and comparison" section: its widgets exist, Compute is enabled only with
    ROIs and an OEF output, calls the Logic with the panel's nodes, and Export / Show comparison do
    what the Logic does (a CSV file; the comparison layout)."""
    ui, widget, module = panel.ui, panel.widget, panel.module
    assert ui.roiStatsCollapsibleButton.property("text").endswith("ROI statistics and comparison")
    for name in ("roiSelector", "referenceSelector", "computeStatsButton", "exportCsvButton", "showComparisonButton"):
        assert ui.roiStatsCollapsibleButton.isAncestorOf(getattr(ui, name)), name
    assert not ui.computeStatsButton.isEnabled() and not ui.exportCsvButton.isEnabled()

    m = np.diag([-2.0, -2.0, 3.0, 1.0])
    rng = np.random.default_rng(2)
    oef = rng.uniform(20, 60, (6, 7, 8)).astype(np.float32)
    truth = (oef + rng.normal(0, 2, oef.shape)).astype(np.float32)
    labels = np.zeros(oef.shape, np.int16)
    labels[1:4, 1:5, 1:5] = 1
    labels[3:6, 3:7, 4:8] = 2
    oefNode = slicer.util.addVolumeFromArray(oef, m, "my OEF")
    truthNode = slicer.util.addVolumeFromArray(truth, m, "truth OEF")
    labelNode = slicer.util.addVolumeFromArray(labels, m, "regions", nodeClassName="vtkMRMLLabelMapVolumeNode")
    ui.outputOEFSelector.setCurrentNode(oefNode)
    assert not ui.computeStatsButton.isEnabled()
    ui.roiSelector.setCurrentNode(labelNode)
    assert ui.roiSelector.currentNode() is labelNode and ui.computeStatsButton.isEnabled()

    calls = []
    real = module.OEFPredictorLogic.compareWithReference

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(module.OEFPredictorLogic, "compareWithReference", spy)
    ui.referenceSelector.setCurrentNode(truthNode)
    ui.computeStatsButton.click()
    assert len(calls) == 1, ui.roiStatsStatusLabel.text()
    (mapNodes, roiNode, reference), kwargs = calls[0]
    assert mapNodes == {"OEF": oefNode} and roiNode is labelNode and reference is truthNode
    assert kwargs["maskNode"] is None and kwargs["tableNode"] is None
    table = widget.statsTable
    assert table is not None and table.GetTable().GetNumberOfRows() == 2
    assert "bias" in ui.roiStatsStatusLabel.text()
    assert ui.exportCsvButton.isEnabled() and ui.showComparisonButton.isEnabled()

    ui.computeStatsButton.click()  # a rerun updates the same table
    assert len(calls) == 2 and calls[1][1]["tableNode"] is table and widget.statsTable is table

    target = tmp_path / "roi.csv"
    monkeypatch.setattr(module.qt.QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(target), "")))
    ui.exportCsvButton.click()
    from OEFPredictorLib import roistats

    rows = roistats.read_csv(target)
    assert [r["roi"] for r in rows] == ["label_1", "label_2"] and str(target) in ui.roiStatsStatusLabel.text()

    ui.showComparisonButton.click()
    layoutNode = widget.logic.layoutNode()
    assert layoutNode.GetViewArrangement() == module.COMPARISON_LAYOUT_ID

    # without a reference: statistics only, through computeRoiStatistics
    ui.referenceSelector.setCurrentNode(None)
    ui.computeStatsButton.click()
    assert len(calls) == 2 and widget.lastComparison is None and not ui.showComparisonButton.isEnabled()
    assert table.GetTable().GetColumnByName("rmse") is not None and "rows" in ui.roiStatsStatusLabel.text()


def test_method_choices_come_from_the_engines_registry(panel):
    from OEFPredictorLib import methods

    combo = panel.ui.methodComboBox
    assert [combo.itemText(i) for i in range(combo.count())] == [m.label for m in methods.METHODS.values()]
    assert panel.widget.method() == methods.DEFAULT_METHOD
    combo.setCurrentIndex(list(methods.METHODS).index("nlls"))
    assert panel.widget.method() == "nlls" and panel.widget.modelFile() is None


def test_interval_maps_reach_their_selectors(panel):
    """A method with an uncertainty interval (stand-in job: slicer_testing.fake_prediction_job)
    fills the quality and interval selectors; the state goes running -> idle."""
    from slicer_testing import fake_prediction_job

    ui, widget = panel.ui, panel.widget
    _ready_panel(panel)
    extra = ("OEF_p05", "OEF_p95", "OEF_width")
    widget.logic = panel.module.OEFPredictorLogic(jobFactory=fake_prediction_job(extra_maps=extra))
    widget.controller.timer.setInterval(5)
    ui.applyButton.click()
    assert widget.controller.state is panel.module.ProcessingState.RUNNING
    spin_until(lambda: not widget.controller.busy)
    assert widget.lastError is None, widget.lastError
    for name in ("quality",) + extra:
        selector = getattr(ui, panel.module.OUTPUT_SELECTORS[name])
        assert selector.currentNode() is widget.lastOutputs[name], name
    assert ui.applyButton.text() == "Apply" and ui.applyButton.isEnabled()


def test_closing_the_scene_cancels_the_run_and_the_panel_goes_idle(panel):
    import threading

    from slicer_testing import fake_prediction_job, scene_node_ids

    ui, widget = panel.ui, panel.widget
    _ready_panel(panel)
    release = threading.Event()
    widget.logic = panel.module.OEFPredictorLogic(jobFactory=fake_prediction_job(release=release))
    widget.controller.timer.setInterval(5)
    ids = scene_node_ids(panel.env.scene)
    ui.applyButton.click()
    widget.onSceneStartClose(None, None)
    assert widget.controller.state is panel.module.ProcessingState.CANCELLING
    spin_until(lambda: not widget.controller.busy, timeout=30)
    assert "Cancelled" in ui.statusLabel.text() and widget.lastOutputs is None
    assert scene_node_ids(panel.env.scene) == ids and ui.applyButton.text() == "Apply"


def test_missing_packages_stop_before_the_run(panel, monkeypatch):
    ui, widget = panel.ui, panel.widget
    _ready_panel(panel)
    states = []
    real = widget.controller.setState
    monkeypatch.setattr(widget.controller, "setState", lambda state: (states.append(state), real(state)))
    monkeypatch.setattr(widget.logic, "ensureDependencies", lambda: ["keras is not installed (needs ==3.15.1)"])
    ui.applyButton.click()
    assert [s.value for s in states] == ["installing", "idle"]
    assert "keras is not installed" in ui.statusLabel.text() and widget.logic.prediction.activeRun is None
    assert ui.applyButton.text() == "Apply" and ui.applyButton.isEnabled()


def render_screenshot(path):
    """The panel after a run on the demo patient, rendered offscreen to PNG."""
    from slicer_testing import slicer_scene

    slicer_scene()
    module, widget = make_panel()
    panel = types.SimpleNamespace(ui=widget.ui, widget=widget, module=module)
    patient, seq, qsm = _ready_panel(panel)
    import shutil
    import tempfile

    from OEFPredictorLib import resources

    try:  # the bundled model when this checkout has it, else a model file (the tiny test LSTM)
        resources.bundled_model_path()
        widget.ui.bundledModelRadioButton.setChecked(True)
    except FileNotFoundError:
        _patient, model_path = __import__("slicer_testing").demo_case()
        folder = Path(tempfile.mkdtemp()) / "models"
        folder.mkdir()
        for suffix in (".keras", ".json"):
            shutil.copy(model_path.with_suffix(suffix), folder / ("my_oef_lstm" + suffix))
        widget.ui.modelPathLineEdit.setCurrentPath(str(folder / "my_oef_lstm.keras"))
    widget.ui.applyButton.click()
    spin_until(lambda: not widget.controller.busy)
    widget.ui.advancedCollapsibleButton.setProperty("collapsed", False)
    widget.ui.backendInfoLabel.setText(widget.logic.backendSummary(detect=True))
    top = widget.parent
    top.resize(440, 10)
    top.show()
    QtWidgets.QApplication.instance().processEvents()
    top.resize(440, top.sizeHint().height())
    QtWidgets.QApplication.instance().processEvents()
    top.grab().save(str(path))
    return path


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--screenshot":
        print(render_screenshot(sys.argv[2]), flush=True)
        os._exit(0)  # skip interpreter teardown: VTK logics and Qt widgets die in arbitrary order
    else:
        sys.exit(pytest.main([__file__, "-q"]))


def test_parameter_node_fields_become_the_wrappers_annotations(monkeypatch):
    """The parameter node is built from PARAMETER_NODE_FIELDS (Slicer's wrapper is not in CI, so its
    markers are stood in for): ranges and defaults land in Annotated, node types resolve in slicer."""
    import typing

    import OEFPredictor as module

    monkeypatch.setattr(module, "WithinRange", lambda lo, hi: ("range", lo, hi))
    monkeypatch.setattr(module, "Default", lambda value: ("default", value))
    fields = module.PARAMETER_NODE_FIELDS
    assert typing.get_args(module._annotation(*fields["fieldStrength"])) == (float, ("range", 0.0, 21.0),
                                                                           ("default", 0.0))  # 0: unknown
    assert typing.get_args(module._annotation(*fields["method"]))[1] == ("default", module.Method[module.methods.DEFAULT_METHOD])
    assert module._annotation(*fields["outputOEF"]) is slicer.vtkMRMLScalarVolumeNode
    assert typing.get_args(module._annotation(*fields["echoVolumes"])) == (slicer.vtkMRMLScalarVolumeNode,)


def test_the_panel_field_strength_comes_from_dicom_and_is_never_assumed(panel):
    """Echo volumes without the DICOM MagneticFieldStrength leave the field 'unknown' and Apply off,
    saying why; volumes that carry it (7 T) fill it in."""
    from slicer_testing import add_echo_volumes, demo_case, ijk_to_ras

    ui = panel.ui
    patient, _ = demo_case()
    assert ui.fieldStrengthSpinBox.value() == 0 and ui.fieldStrengthSpinBox.text() == "unknown"
    ui.methodComboBox.setCurrentIndex(list(panel.module.Method).index(panel.module.Method.nlls))
    ui.qsmSelector.setCurrentNode(slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM"))
    ui.echoVolumesRadioButton.setChecked(True)
    plain = add_echo_volumes(patient, dicom_field=False)
    for node in plain:
        ui.echoVolumesSelector.setCheckState(node, QtCore.Qt.CheckState.Checked)
    ui.echoTimesLineEdit.setText(", ".join(f"{t:g}" for t in patient.protocol.echo_times_ms))
    assert not ui.applyButton.isEnabled() and "field strength" in _tooltip(ui)
    assert panel.widget.settings().fieldStrength is None
    for node in plain:
        ui.echoVolumesSelector.setCheckState(node, QtCore.Qt.CheckState.Unchecked)
        node.SetAttribute("DICOM.MagneticFieldStrength", "7")
    for node in plain:
        ui.echoVolumesSelector.setCheckState(node, QtCore.Qt.CheckState.Checked)
    assert panel.widget.settings().fieldStrength == 7.0
    assert ui.applyButton.isEnabled(), _tooltip(ui)


def test_a_field_map_needs_its_unit_and_reaches_the_logic_with_it(panel, monkeypatch):
    """A field map volume keeps Apply off until its unit is chosen (none is assumed); Apply then gives
    the Logic the field map node and the unit."""
    from slicer_testing import ijk_to_ras

    ui = panel.ui
    patient, seq, qsm = _ready_panel(panel)
    assert panel.widget.settings().fieldMapUnits is None  # unset by default
    field = slicer.util.addVolumeFromArray(np.zeros_like(patient.qsm), ijk_to_ras(patient.geometry), "field map")
    ui.fieldMapSelector.setCurrentNode(field)
    assert not ui.applyButton.isEnabled() and "field map's unit" in _tooltip(ui)
    ui.fieldMapUnitsComboBox.setCurrentIndex(list(panel.module.FieldMapUnit).index(panel.module.FieldMapUnit.Hz))
    assert ui.applyButton.isEnabled(), _tooltip(ui)
    assert panel.widget.settings().fieldMapUnits == "Hz"
    given = {}

    def start(echoes, qsm_node, mask=None, cbf=None, fieldMap=None, settings=None):
        given.update(fieldMap=fieldMap, units=settings.fieldMapUnits)
        raise panel.module.InputError("stopped here by the test")

    monkeypatch.setattr(panel.widget.logic, "startPrediction", start)
    ui.applyButton.click()
    assert given == {"fieldMap": field, "units": "Hz"}
    assert "stopped here by the test" in str(panel.widget.lastError)
