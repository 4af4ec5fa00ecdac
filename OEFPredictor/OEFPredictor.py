"""OEFPredictor: oxygen extraction fraction (OEF) maps in 3D Slicer.

This file holds what Slicer's scripted-module template asks for: OEFPredictor (metadata), the
parameter node, OEFPredictorWidget (the Qt panel, thin), a thin OEFPredictorLogic and
OEFPredictorTest (the self-test). The work is elsewhere:

- OEFPredictorSlicer/prediction.py   MRML nodes -> engine -> output volumes (PredictionSettings)
- OEFPredictorSlicer/display.py      colour tables, windows, overlay, colour legend
- OEFPredictorSlicer/comparison.py   ROI statistics, difference map, plots, comparison layout, CSV
- OEFPredictorSlicer/environment.py  Python packages (slicer.packaging), model and backend summaries
- OEFPredictorSlicer/processing.py   the processing state and the job polling of both panels
- OEFPredictorLib/                   the engine, shared with the command line (no Qt, no slicer)

Importing this file needs no TensorFlow and no main window: Keras is imported only when a
prediction starts. It also imports under the slicer-core wheel (real MRML, no Qt, no application)
so that CI tests the Logic against a real MRML scene (see OEFPredictorSlicer/compat.py).
"""
from __future__ import annotations

import enum
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import numpy as np

import slicer

_MODULE_DIR = Path(__file__).resolve().parent
if str(_MODULE_DIR) not in sys.path:  # Slicer adds it; plain Python (tests, scripts) may not
    sys.path.insert(0, str(_MODULE_DIR))

from OEFPredictorLib import fieldmap, maptable, methods, physics, predict  # noqa: E402  (no Keras at import)
from OEFPredictorLib.errors import CancelledError, InputError  # noqa: E402
from OEFPredictorSlicer import display, environment  # noqa: E402
from OEFPredictorSlicer.comparison import (  # noqa: E402  (names scripts and tests use)
    COMPARISON_LAYOUT_ID,
    COMPARISON_LAYOUT_XML,
    COMPARISON_PLOT_VIEWS,
    COMPARISON_SLICE_VIEWS,
    COMPARISON_TABLE_VIEW,
    COMPARISON_VIEW_GROUP,
    ComparisonLogic,
)
from OEFPredictorSlicer.compat import (  # noqa: E402
    IN_SLICER_APP,
    Default,
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
    VTKObservationMixin,
    WithinRange,
    _,
    parameterNodeWrapper,
    qt,
    qtProperty,
    showError,
    translate,
)
from OEFPredictorSlicer.prediction import (  # noqa: E402
    PredictionLogic,
    PredictionRun,
    PredictionSettings,
    echoCount,
)
from OEFPredictorSlicer.processing import JobController, ProcessingState  # noqa: E402

OEFPredictorRun = PredictionRun  # the name of the run object in scripts written before the split

# map name -> the panel's output selector (maptable.MAPS); its parameter-node field is the name
# without "Selector"
OUTPUT_SELECTORS = {m.name: m.panel_field + "Selector" for m in maptable.MAPS.values() if m.panel}


def _choices(name, labels):
    """An Enum of {value: label}: Slicer's combo-box connector lists its members by label()."""
    choices = enum.Enum(name, [(value, value) for value in labels])
    choices.label = lambda member: labels[member.value]
    return choices


Device = _choices("Device", {"auto": _("Automatic (GPU if available)"), "cpu": _("CPU"), "gpu": _("GPU")})
Method = _choices("Method", {m.name: m.label for m in methods.METHODS.values()})  # the engine's registry
# a field map's unit: none is assumed (a run with a field map and no unit is refused)
FieldMapUnit = _choices("FieldMapUnit", {"unset": _("Choose the unit"), **{unit: unit for unit in fieldmap.UNITS}})
assert [d.value for d in Device] == list(predict.DEVICES)

# The panel's state, saved with the scene: field -> (type, default, (min, max)). The .ui binds its
# widgets to these names (SlicerParameterName); node types are named, as the slicer-core wheel lacks
# some. The settings are PredictionSettings' (the model as useBundledModel + modelPath), the outputs
# one volume per map the panel offers (maptable.MAPS). Not bound, for want of a connector, and kept
# in sync by the widget: echoSource and useBundledModel (radio buttons), echoVolumes (a checkable list).
PARAMETER_NODE_FIELDS = {
    "echoSource": (str, "sequence", None),  # "sequence" (echoSequence) or "volumes"
    "echoSequence": ("vtkMRMLSequenceNode", None, None),
    "echoVolumes": ("list[vtkMRMLScalarVolumeNode]", None, None),
    "qsm": ("vtkMRMLScalarVolumeNode", None, None),
    "mask": ("vtkMRMLScalarVolumeNode", None, None),
    "cbf": ("vtkMRMLScalarVolumeNode", None, None),
    "fieldMap": ("vtkMRMLScalarVolumeNode", None, None),
    "fieldMapUnits": (FieldMapUnit, FieldMapUnit.unset, None),
    "echoTimesMs": (str, None, None),
    "fieldStrength": (float, 0.0, (0.0, 21.0)),  # 0: unknown (shown so; never assumed)
    "useBundledModel": (bool, True, None),
    "modelPath": (str, None, None),
    "device": (Device, Device.auto, None),
    "method": (Method, Method[methods.DEFAULT_METHOD], None),
    "opacity": (float, 0.6, (0.0, 1.0)),
    **{field: ("vtkMRMLScalarVolumeNode", None, None) for field in (s[:-len("Selector")] for s in OUTPUT_SELECTORS.values())},
}


def resourcePath(*parts):
    """A shipped resource, in the source tree (Resources/ at the top) and in a Slicer build."""
    from OEFPredictorLib import resources

    return resources.resource_path(*parts)


#
# OEFPredictor
#


class OEFPredictor(ScriptedLoadableModule):
    """Module metadata: title, category, help and acknowledgement."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("OEF Predictor")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["OEFPredictor developers"]
        self.parent.helpText = _("""
Maps the brain's <b>oxygen extraction fraction (OEF, %)</b> and the QQ-model parameters (S0, R2 in Hz,
venous oxygen saturation Y, venous blood volume fraction v, non-blood susceptibility chi_nb in ppm) from
a multi-echo gradient-echo (mGRE) <b>magnitude</b> series and a <b>QSM</b> map (ppm), with the spatial
context network (the default; also a 90 % OEF interval, shown as its width), the paper's LSTM, an
experimental 3D U-Net, a DNN, or a voxelwise QQ fit.
<ul>
<li><b>Echoes</b>: a sequence whose index values are the echo times, or scalar volumes ticked in echo
order. The echo times (ms) are filled from the sequence or the DICOM attributes; check them.</li>
<li><b>QSM</b> in ppm, on the same voxel grid as the echoes; optional brain mask and CBF
(mL/100 g/min, adds a CMRO2 map).</li>
<li><b>Field map</b> (recommended): the QSM pipeline's total or background field, with its unit. The
echoes are corrected for the signal that field gradients take near the sinuses and ear canals; without
it, OEF there can read 4-39 points low.</li>
<li>Echo times and field strength come from the data's metadata (check them). The default method reads
5-16 echoes at 1.5-7 T whose echoes, in 3 T-equivalent time (TE x B0 / 3), start by 8.5 ms and reach 39 ms;
shorter trains that reach 18 ms go to a second network, with a warning (lesions may not show). The paper's
LSTM needs its own protocol: 8 echoes, TE 4.5-39.5 ms, 3 T.</li>
</ul>
Research software, not a medical device. See the
<a href="https://github.com/oefpredictor/SlicerOEFPredictor">project page</a>.
""")
        self.parent.acknowledgementText = _("""
Method: Kim and Lee, "OEF mapping with an LSTM network on QSM and mGRE", J. KIIT 22(6), 2024.
QQ model: Cho J, et al. Cluster analysis of time evolution (CAT) for quantitative susceptibility mapping
(QSM) and quantitative blood oxygen level-dependent magnitude (qBOLD)-based oxygen extraction fraction
(OEF) and cerebral metabolic rate of oxygen (CMRO2) mapping. MRM 2018 and MRM 2020.
Anatomy of the virtual patients: MNI ICBM152 2009a templates (c) McConnell Brain Imaging Centre.
""")

#
# Parameter node (Slicer application only)
#

def _annotation(kind, default, within):
    """A PARAMETER_NODE_FIELDS entry as parameterNodeWrapper reads it (Annotated with its range and default)."""
    if isinstance(kind, str):
        kind = list[getattr(slicer, kind[5:-1])] if kind.startswith("list[") else getattr(slicer, kind)
    extras = ([WithinRange(*within)] if within else []) + ([Default(default)] if default is not None else [])
    return Annotated[(kind, *extras)] if extras else kind


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class OEFPredictorParameterNode:
        """The panel's state (PARAMETER_NODE_FIELDS), saved with the scene."""

        __annotations__ = {name: _annotation(*spec) for name, spec in PARAMETER_NODE_FIELDS.items()}

else:
    OEFPredictorParameterNode = None


#
# OEFPredictorWidget
#


class OEFPredictorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: thin; state in the parameter node, work in the Logic, the run's state in the
    shared JobController (idle, installing, running, cancelling)."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.controller = None
        self.lastOutputs = None
        self.lastError = None
        self.statsTable = None  # the ROI statistics table node (reruns update it)
        self.lastComparison = None  # OEFPredictorLogic.compareWithReference's result

    # --- setup ----------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(resourcePath("UI", "OEFPredictor.ui")))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = OEFPredictorLogic()

        # the same items, in the same order, as the parameter node's connector lists (Enum labels)
        for combo, choices in ((self.ui.deviceComboBox, Device), (self.ui.methodComboBox, Method),
                               (self.ui.fieldMapUnitsComboBox, FieldMapUnit)):
            combo.clear()
            for member in choices:
                combo.addItem(member.label())
        self.ui.methodComboBox.setCurrentIndex(list(Method).index(Method[methods.DEFAULT_METHOD]))
        self.ui.methodComboBox.setToolTip(methods.help_text())
        self.ui.progressBar.setValue(0)
        self.controller = JobController(self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel,
                                        onFinished=self.onPredictionFinished, onIdle=self.updateApplyState)

        # Everything that changes whether Apply makes sense
        for selector in (self.ui.echoSequenceSelector, self.ui.qsmSelector, self.ui.maskSelector,
                         self.ui.cbfSelector, self.ui.fieldMapSelector):
            selector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.fieldMapUnitsComboBox.currentIndexChanged.connect(self.onInputChanged)
        self.ui.echoSequenceSelector.currentNodeChanged.connect(self.onEchoSourceNodesChanged)
        self.ui.echoVolumesSelector.checkedNodesChanged.connect(self.onEchoSourceNodesChanged)
        self.ui.echoSequenceRadioButton.toggled.connect(self.onEchoSourceToggled)
        self.ui.echoVolumesRadioButton.toggled.connect(self.onEchoSourceToggled)
        self.ui.echoTimesLineEdit.textChanged.connect(self.onInputChanged)
        self.ui.bundledModelRadioButton.toggled.connect(self.onModelChanged)
        self.ui.modelFileRadioButton.toggled.connect(self.onModelChanged)
        self.ui.modelPathLineEdit.currentPathChanged.connect(self.onModelChanged)
        self.ui.methodComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.detectBackendButton.clicked.connect(self.onDetectBackend)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        # ROI statistics and comparison with a reference: the work is in the Logic
        for selector in (self.ui.roiSelector, self.ui.referenceSelector, self.ui.outputOEFSelector):
            selector.currentNodeChanged.connect(self.updateRoiStatsButtons)
        self.ui.computeStatsButton.clicked.connect(self.onComputeStats)
        self.ui.exportCsvButton.clicked.connect(self.onExportCsv)
        self.ui.showComparisonButton.clicked.connect(self.onShowComparison)

        if IN_SLICER_APP:
            self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
            self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
            self.initializeParameterNode()
        self.onEchoSourceToggled()
        self.onModelChanged()
        self.ui.backendInfoLabel.setText(self.logic.backendSummary(detect=False))
        self.updateRoiStatsButtons()

    def cleanup(self):
        self.removeObservers()
        if self.controller is not None:
            self.controller.stop()

    def enter(self):
        if IN_SLICER_APP:
            self.initializeParameterNode()

    def exit(self):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.controller.cancel()  # a run of the closing scene writes nothing; the panel goes idle
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node (application only) --------------------------------------------------------
    def initializeParameterNode(self):
        if OEFPredictorParameterNode is None:
            return
        self.setParameterNode(OEFPredictorParameterNode(self.logic.getParameterNode()))

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # the checkable list has no connector: restore it by hand, then bind the rest
            volumes = list(self._parameterNode.echoVolumes or [])
            for i in range(self.ui.echoVolumesSelector.nodeCount()):
                node = self.ui.echoVolumesSelector.nodeFromIndex(i)
                self.ui.echoVolumesSelector.setCheckState(node, qt.Qt.Checked if node in volumes else qt.Qt.Unchecked)
            # radio buttons have no connector either
            p = self._parameterNode
            self.ui.echoVolumesRadioButton.setChecked(p.echoSource == "volumes")
            self.ui.echoSequenceRadioButton.setChecked(p.echoSource != "volumes")
            self.ui.bundledModelRadioButton.setChecked(bool(p.useBundledModel))
            self.ui.modelFileRadioButton.setChecked(not p.useBundledModel)
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
        self.updateApplyState()

    # --- reading the panel ------------------------------------------------------------------------
    def echoInput(self):
        """The echoes as the Logic takes them: a sequence node, a list of volume nodes, or None."""
        if self.ui.echoSequenceRadioButton.isChecked():
            return self.ui.echoSequenceSelector.currentNode()
        nodes = list(self.ui.echoVolumesSelector.checkedNodes())
        return nodes or None

    def echoTimesMs(self):
        """The echo times typed in the panel (ms); raises InputError with what is wrong."""
        try:
            return physics.parse_echo_times_ms(qtProperty(self.ui.echoTimesLineEdit, "text"))
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def fieldStrength(self):
        """The panel's field strength (T); None while it shows 'unknown' (0)."""
        value = qtProperty(self.ui.fieldStrengthSpinBox, "value")
        return float(value) if value and value > 0 else None

    def method(self):
        return list(Method)[qtProperty(self.ui.methodComboBox, "currentIndex")].value

    def device(self):
        return list(Device)[qtProperty(self.ui.deviceComboBox, "currentIndex")].value

    def fieldMapUnits(self):
        """The field map's unit chosen in the panel, or None while unset."""
        unit = list(FieldMapUnit)[qtProperty(self.ui.fieldMapUnitsComboBox, "currentIndex")]
        return None if unit is FieldMapUnit.unset else unit.value

    def model(self):
        """None (the method's bundled model) or the model file typed in the panel."""
        if self.ui.bundledModelRadioButton.isChecked():
            return None
        return qtProperty(self.ui.modelPathLineEdit, "currentPath") or ""

    def settings(self, echoTimes=True):
        """The run's PredictionSettings, read from the panel (bound to the parameter node); the echo
        times are parsed (InputError) unless echoTimes is False."""
        return PredictionSettings(
            echoTimesMs=self.echoTimesMs() if echoTimes else None,
            fieldStrength=self.fieldStrength(), fieldMapUnits=self.fieldMapUnits(), model=self.model(),
            device=self.device(),
            method=self.method(), opacity=qtProperty(self.ui.opacitySliderWidget, "value"),
            outputNodes={name: getattr(self.ui, selector).currentNode() for name, selector in OUTPUT_SELECTORS.items()})

    def modelSummaryText(self, needsModel):
        """The models the panel's choice may run, one summary each (the bundled ones in order of preference)."""
        try:
            return environment.modelsSummary(self.settings(echoTimes=False).modelFiles(), needsModel)
        except FileNotFoundError:
            return _("The bundled model is not installed; choose a model file.")

    def modelFile(self):
        """The model file the panel's choice runs (None: the method needs none; '': none available)."""
        try:
            model = self.settings(echoTimes=False).modelFile()
        except FileNotFoundError:
            return ""
        return None if model is None else str(model)

    def missingInputs(self):
        """Reasons Apply cannot run now (empty when it can)."""
        missing = []
        echoes = self.echoInput()
        if echoes is None:
            missing.append(_("Choose the echo sequence, or tick the echo volumes in echo order."))
        elif isinstance(echoes, list) and len(echoes) < 2:
            missing.append(_("Tick at least two echo volumes."))
        if self.ui.qsmSelector.currentNode() is None:
            missing.append(_("Choose the QSM volume (ppm)."))
        try:
            tes = self.echoTimesMs()
            n = echoCount(echoes) if echoes is not None else None
            if n is not None and len(tes) != n:
                missing.append(_("Give {n} echo times (ms); {m} are typed.").format(n=n, m=len(tes)))
        except InputError as exc:
            missing.append(str(exc))
        if self.fieldStrength() is None:
            missing.append(_("Set the field strength (T): the echoes carry no DICOM MagneticFieldStrength."))
        if self.ui.fieldMapSelector.currentNode() is not None and self.fieldMapUnits() is None:
            missing.append(_("Choose the field map's unit ({units}).").format(units=fieldmap.UNITS_LISTED))
        model = self.modelFile()
        if model == "" and self.model() is None:
            missing.append(_("The bundled model is not installed; choose a model file."))
        elif model == "":
            missing.append(_("Choose a model file (.keras, with its .json card beside it)."))
        elif model is not None and (not os.path.isfile(model) or not os.path.isfile(os.path.splitext(model)[0] + ".json")):
            missing.append(_("The model file or its .json card does not exist."))
        return missing

    # --- reacting ---------------------------------------------------------------------------------
    def onEchoSourceToggled(self, *args):
        useSequence = self.ui.echoSequenceRadioButton.isChecked()
        self.ui.echoSequenceSelector.setEnabled(useSequence)
        self.ui.echoVolumesSelector.setEnabled(not useSequence)
        if self._parameterNode:
            self._parameterNode.echoSource = "sequence" if useSequence else "volumes"
        self.onEchoSourceNodesChanged()

    def onEchoSourceNodesChanged(self, *args):
        """Fill the echo times from the sequence index or the volumes' DICOM attributes, and the
        field strength from their DICOM MagneticFieldStrength."""
        echoes = self.echoInput()
        if self._parameterNode and not self.ui.echoSequenceRadioButton.isChecked():
            self._parameterNode.echoVolumes = list(echoes or [])
        if echoes is not None:
            try:
                tes = self.logic.echoTimesFromNodes(echoes)
            except InputError:
                tes = None
            if tes:
                self.ui.echoTimesLineEdit.setText(", ".join(f"{t:g}" for t in tes))
            field = self.logic.prediction.fieldStrengthFromNodes(echoes)
            if field:
                self.ui.fieldStrengthSpinBox.setValue(field)
        self.updateApplyState()

    def onModelChanged(self, *args):
        needsModel = methods.get(self.method()).uses_model
        for w in (self.ui.bundledModelRadioButton, self.ui.modelFileRadioButton):
            w.setEnabled(needsModel)
        self.ui.modelPathLineEdit.setEnabled(needsModel and self.ui.modelFileRadioButton.isChecked())
        self.ui.modelInfoLabel.setText(self.modelSummaryText(needsModel))
        if self._parameterNode:
            self._parameterNode.useBundledModel = self.ui.bundledModelRadioButton.isChecked()
        self.updateApplyState()

    def onInputChanged(self, *args):
        self.updateApplyState()

    def updateApplyState(self):
        if self.controller is None or self.controller.busy:  # the button is Cancel, or disabled
            return
        missing = self.missingInputs()
        self.ui.applyButton.setEnabled(not missing)
        if missing:
            self.ui.applyButton.setToolTip(_("Cannot run yet:") + "\n- " + "\n- ".join(missing))
        else:
            self.ui.applyButton.setToolTip(_("Compute the OEF and parameter maps in the background."))

    def onDetectBackend(self, *args):
        self.ui.backendInfoLabel.setText(self.logic.backendSummary(detect=True))

    # --- ROI statistics and comparison ------------------------------------------------------------
    def outputMapNodes(self):
        """{map name: node} of the output selectors that hold a volume."""
        nodes = {name: getattr(self.ui, selector).currentNode() for name, selector in OUTPUT_SELECTORS.items()}
        return {name: node for name, node in nodes.items() if node is not None}

    def updateRoiStatsButtons(self, *args):
        ready = self.ui.roiSelector.currentNode() is not None and self.ui.outputOEFSelector.currentNode() is not None
        self.ui.computeStatsButton.setEnabled(ready)
        self.ui.computeStatsButton.setToolTip(
            _("Exact statistics of the output maps in each ROI; with a reference, also the difference map and "
              "the plots.") if ready else _("Choose the ROIs and an output OEF volume first."))
        self.ui.exportCsvButton.setEnabled(self.statsTable is not None and self.statsTable.GetScene() is not None)
        self.ui.showComparisonButton.setEnabled(self.lastComparison is not None)

    def onComputeStats(self, *args):
        roiNode = self.ui.roiSelector.currentNode()
        reference = self.ui.referenceSelector.currentNode()
        mapNodes = self.outputMapNodes()
        maskNode = self.ui.maskSelector.currentNode()
        if self.statsTable is not None and self.statsTable.GetScene() is None:
            self.statsTable = None  # removed from the scene: make a new one
        try:
            if reference is not None:
                self.lastComparison = self.logic.compareWithReference(mapNodes, roiNode, reference, maskNode=maskNode,
                                                                      tableNode=self.statsTable)
                self.statsTable = self.lastComparison["statistics"]
                c = self.lastComparison
                text = _("{rows} rows in '{table}'. OEF minus reference: bias {b:.3g}, limits of agreement {lo:.3g} "
                         "to {hi:.3g} ({n:,} voxels; the plots show {m:,}).").format(
                    rows=self.statsTable.GetNumberOfRows(), table=self.statsTable.GetName(), b=c["meanDifference"],
                    lo=c["loaLower"], hi=c["loaUpper"], n=c["nPairs"], m=c["nShown"])
            else:
                self.lastComparison = None
                self.statsTable = self.logic.computeRoiStatistics(mapNodes, roiNode, maskNode=maskNode,
                                                                  tableNode=self.statsTable)
                text = _("{rows} rows in '{table}'.").format(rows=self.statsTable.GetNumberOfRows(),
                                                           table=self.statsTable.GetName())
        except InputError as exc:
            self.lastError = exc
            self.ui.roiStatsStatusLabel.setText(_("Failed: ") + str(exc).splitlines()[0][:200])
            showError(str(exc))
        else:
            self.ui.roiStatsStatusLabel.setText(text)
        self.updateRoiStatsButtons()

    def onExportCsv(self, *args):
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Export ROI statistics"), "oef_roi_statistics.csv",
                                              _("CSV files (*.csv)"))
        if isinstance(path, (tuple, list)):  # PySide returns (path, filter); PythonQt the path
            path = path[0]
        if not path:
            return
        try:
            written = self.logic.exportTableToCsv(self.statsTable, path)
        except (InputError, OSError) as exc:
            self.ui.roiStatsStatusLabel.setText(_("Failed: ") + str(exc).splitlines()[0][:200])
            showError(str(exc))
            return
        self.ui.roiStatsStatusLabel.setText(_("Wrote {path}").format(path=written))

    def onShowComparison(self, *args):
        c = self.lastComparison
        if c is None:
            return
        mapNode = self.ui.outputOEFSelector.currentNode()
        self.logic.showComparisonLayout(mapNode, self.ui.referenceSelector.currentNode(), c["difference"],
                                        c["scatterChart"], c["blandAltmanChart"], c["statistics"])

    # --- run --------------------------------------------------------------------------------------
    def onApplyButton(self, *args):
        if self.controller.busy:
            self.controller.cancel(_("Cancelling after the current chunk..."))
            return
        self.lastOutputs = None
        self.lastError = None
        if methods.get(self.method()).uses_model:
            self.controller.setState(ProcessingState.INSTALLING)
            unmet = self.logic.ensureDependencies()
            self.controller.setState(ProcessingState.IDLE)
            if unmet:
                self._showError(_("Python packages are missing: {what}. Restart Slicer if they were just "
                                  "installed.").format(what="; ".join(unmet)))
                return
        try:
            run = self.logic.startPrediction(self.echoInput(), self.ui.qsmSelector.currentNode(),
                                             mask=self.ui.maskSelector.currentNode(),
                                             cbf=self.ui.cbfSelector.currentNode(),
                                             fieldMap=self.ui.fieldMapSelector.currentNode(), settings=self.settings())
        except InputError as exc:
            self.lastError = exc
            self._showError(str(exc))
            return
        self.controller.start(run)

    def onPredictionFinished(self, run):
        """Main thread, the run done: write the outputs (or say why not)."""
        try:
            self.lastOutputs = run.finish()
        except CancelledError:
            self.ui.statusLabel.setText(_("Cancelled; no volume was created or changed."))
            return
        except Exception as exc:  # shown to the user; details in the log
            self.lastError = exc
            if not isinstance(exc, InputError):
                logging.error("OEFPredictor failed", exc_info=exc)
            self._showError(str(exc))
            return
        for name, node in self.lastOutputs.items():
            if name in OUTPUT_SELECTORS:
                getattr(self.ui, OUTPUT_SELECTORS[name]).setCurrentNode(node)
        self.ui.progressBar.setValue(100)
        self.ui.statusLabel.setText(run.summary())

    def _showError(self, message):
        self.ui.statusLabel.setText(_("Failed: ") + message.splitlines()[0][:200])
        showError(message)


#
# OEFPredictorLogic
#


class OEFPredictorLogic(ScriptedLoadableModuleLogic):
    """MRML nodes in, MRML nodes out; usable from Python without the panel. One call does it all::

        logic = OEFPredictorLogic()
        outputs = logic.process(echoSequenceNode, qsmNode)   # waits; {"OEF": node, "S0": node, ...}

    or, without blocking: run = logic.startPrediction(...); poll run.progress() / run.done from a
    QTimer; run.finish() writes the outputs; run.cancel() stops between chunks.

    It delegates: prediction to self.prediction (OEFPredictorSlicer.prediction.PredictionLogic),
    ROI statistics and the comparison to self.comparison (comparison.ComparisonLogic), display and
    environment to those modules' functions. jobFactory: see PredictionLogic (tests pass fakes).
    """

    def __init__(self, jobFactory=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.prediction = PredictionLogic(jobFactory)
        self.comparison = ComparisonLogic(self.prediction.predictionMasks)

    # --- prediction (settings: a PredictionSettings; keywords override its fields) ---------------
    def process(self, echoes, qsm, mask=None, cbf=None, settings=None, wait=True, timeout=None, fieldMap=None,
                **overrides):
        return self.prediction.process(echoes, qsm, mask, cbf, settings, wait, timeout, fieldMap, **overrides)

    def startPrediction(self, echoes, qsm, mask=None, cbf=None, settings=None, fieldMap=None, **overrides):
        return self.prediction.startPrediction(echoes, qsm, mask, cbf, settings, fieldMap, **overrides)

    def echoTimesFromNodes(self, echoes):
        return self.prediction.echoTimesFromNodes(echoes)

    # --- display ----------------------------------------------------------------------------------
    def setMapDisplay(self, node, name, array, mask=None):
        return display.setMapDisplay(node, name, array, mask)

    # --- ROI statistics and comparison --------------------------------------------------------------
    def computeRoiStatistics(self, mapNodes, roiNode, referenceNodes=None, maskNode=None, tableNode=None):
        return self.comparison.computeRoiStatistics(mapNodes, roiNode, referenceNodes, maskNode, tableNode)

    def compareWithReference(self, mapNodes, roiNode, referenceNode, maskNode=None, tableNode=None,
                             mapName="OEF", showLayout=False, maxPoints=None):
        return self.comparison.compareWithReference(mapNodes, roiNode, referenceNode, maskNode, tableNode, mapName,
                                                    showLayout, maxPoints)

    def exportTableToCsv(self, tableNode, path):
        return self.comparison.exportTableToCsv(tableNode, path)

    def roisFromNode(self, roiNode, referenceVolume):
        return self.comparison.roisFromNode(roiNode, referenceVolume)

    def differenceMap(self, mapNode, referenceNode, outputNode=None):
        return self.comparison.differenceMap(mapNode, referenceNode, outputNode)

    def comparisonPlots(self, mapNode, referenceNode, roiNode, maskNode=None, maxPoints=None, seed=0):
        return self.comparison.comparisonPlots(mapNode, referenceNode, roiNode, maskNode, maxPoints, seed)

    def showComparisonLayout(self, mapNode, referenceNode, differenceNode, scatterChart=None, blandAltmanChart=None,
                             tableNode=None):
        return self.comparison.showComparisonLayout(mapNode, referenceNode, differenceNode, scatterChart,
                                                    blandAltmanChart, tableNode)

    def layoutNode(self):
        return self.comparison.layoutNode()

    def tableRows(self, tableNode):
        return self.comparison.tableRows(tableNode)

    # --- environment --------------------------------------------------------------------------------
    def modelSummary(self, model=None, method=methods.DEFAULT_METHOD):
        """One line about a model: a path, or None for the method's bundled models."""
        try:
            files = PredictionSettings(model=model, method=method).modelFiles()
        except FileNotFoundError:
            return _("The bundled model is not installed; choose a model file.")
        return environment.modelsSummary(files, methods.get(method).uses_model)

    def unmetRequirements(self):
        """Resources/requirements.txt lines that the installed versions do not meet."""
        return environment.unmetRequirements(environment.loadRequirements(resourcePath("requirements.txt")))

    def backendSummary(self, detect=False):
        return environment.backendSummary(self.unmetRequirements(), detect)

    def ensureDependencies(self):
        """Install TensorFlow/Keras on first use (slicer.packaging.pip_ensure asks the user first);
        returns what is still unmet (empty: ready). Main thread; never at import."""
        return environment.ensureRequirements(resourcePath("requirements.txt"), requester="OEFPredictor")


#
# OEFPredictorTest
#


class OEFPredictorTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer: a small virtual patient, a tiny untrained network, the full Logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_OEFPredictor_logic()

    def test_OEFPredictor_logic(self):
        import tempfile

        from OEFPredictorLib import models, physics, simulate

        if OEFPredictorLogic().unmetRequirements():
            self.delayDisplay("TensorFlow not installed: skipping the prediction self-test")
            return
        self.delayDisplay("Simulating a small virtual patient")
        with tempfile.TemporaryDirectory() as tmp:
            folder = simulate.simulate_dataset(tmp, n_patients=1, seed=5, voxel_size=6.0, lesions=False)[0]
            patient = simulate.load_patient(folder, with_truth=False)
            protocol = patient.protocol
            spec = {"architecture": "lstm", "cell": "lstm", "units": [8, 8], "dense": [8]}
            card = models.make_card(spec, protocol, {"parameters": list(physics.PARAMETER_NAMES),
                                                     "mean": [1.0, 15.0, 0.6, 0.03, 0.0],
                                                     "std": [0.1, 5.0, 0.1, 0.01, 0.05]}, 5, "centre")
            modelPath = models.save_bundle(models.build_model(spec), card, Path(tmp) / "tiny.keras")
            ijkToRAS = np.diag([-6.0, -6.0, 6.0, 1.0])
            echoNodes = [slicer.util.addVolumeFromArray(patient.echoes[..., e], ijkToRAS, f"echo{e + 1}")
                         for e in range(protocol.n_echoes)]
            qsmNode = slicer.util.addVolumeFromArray(patient.qsm, ijkToRAS, "QSM")
            self.delayDisplay("Predicting")
            outputs = OEFPredictorLogic().process(echoNodes, qsmNode, echoTimesMs=protocol.echo_times_ms,
                                                  model=str(modelPath), device="cpu", method="lstm")
        self.assertEqual(set(maptable.BASE), set(outputs))
        self.assertEqual(outputs["OEF"].GetImageData().GetDimensions(), echoNodes[0].GetImageData().GetDimensions())
        self.delayDisplay("Test passed")
