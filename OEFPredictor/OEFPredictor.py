"""OEFPredictor: oxygen extraction fraction (OEF) maps in 3D Slicer.

Slicer's scripted-module template: OEFPredictor (metadata), OEFPredictorWidget (the Qt panel, thin),
OEFPredictorLogic (MRML <-> numpy, the background run, output nodes, colours, overlays; usable from
Python without the panel) and OEFPredictorTest (the self-test).

Importing this file needs no TensorFlow and no main window: the engine (OEFPredictorLib.predict,
which imports Keras) is imported only when a prediction starts, and Qt is used only by the widget.
The same file also imports under the slicer-core wheel (real MRML, no Qt, no Slicer application)
so that CI can test the Logic against a real MRML scene; see the guarded imports below.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np
import vtk

import slicer
from slicer.util import VTKObservationMixin

_MODULE_DIR = Path(__file__).resolve().parent
if str(_MODULE_DIR) not in sys.path:  # Slicer adds it; plain Python (tests, scripts) may not
    sys.path.insert(0, str(_MODULE_DIR))

from OEFPredictorLib.errors import CancelledError, InputError  # noqa: E402  (pure Python, no Keras)

# --- Slicer-application-only imports, guarded ---------------------------------------------------
# Inside the Slicer application these all exist. Under the slicer-core wheel (CI) there is no Qt,
# no ScriptedLoadableModule, no parameterNodeWrapper and no slicer.i18n: the minimal fallbacks
# below exist ONLY so that the Logic can be imported and tested there; Slicer never uses them.
try:
    import qt  # PythonQt in Slicer; a test may put a PySide6-based shim here
except ImportError:  # slicer-core wheel: no Qt at all
    qt = None

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # outside the application: no translation

    def _(text):
        return text

    def translate(context, text):
        return text

try:
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    IN_SLICER_APP = True
except ImportError:
    IN_SLICER_APP = False

    class ScriptedLoadableModule:  # fallback outside the Slicer application only
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # fallback outside the Slicer application only
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest:  # fallback outside the Slicer application only
        def delayDisplay(self, message, msec=0):
            logging.info(message)

    class ScriptedLoadableModuleWidget:  # fallback outside the Slicer application only (needs qt)
        def __init__(self, parent=None):
            if parent is None:
                parent = qt.QWidget()
                parent.setLayout(qt.QVBoxLayout())
            self.parent = parent
            self.layout = parent.layout()

        def setup(self):
            pass

        def cleanup(self):
            pass

try:
    from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
except ImportError:  # slicer-core wheel: the panel (and its parameter node) exists only in the app
    parameterNodeWrapper = None

from typing import Annotated  # noqa: E402


# --- What the maps are and how they are shown ---------------------------------------------------
MAP_NAMES = ("OEF", "S0", "R2", "Y", "v", "chi_nb")
OPTIONAL_MAP_NAMES = ("CMRO2",)
METHODS = ("lstm", "dnn", "nlls", "cat", "ccm")
METHODS_WITH_MODEL = {"lstm": "oef_lstm.keras", "dnn": "oef_dnn.keras"}
DEVICES = ("auto", "cpu", "gpu")

# range: fixed display range (None: 1st-99th percentile inside the mask); colors: table kind;
# threshold: hide voxels at or below this value (None: hide the engine's background value when
# it lies outside the map's in-mask range).
MAP_DISPLAY = {
    "OEF": {"title": "OEF", "unit": "%", "range": (0.0, 80.0), "colors": "viridis", "format": "%.0f",
            "threshold": 1e-3},
    "S0": {"title": "S0", "unit": "a.u.", "range": None, "colors": "grey", "format": "%.3g", "threshold": None},
    "R2": {"title": "R2", "unit": "Hz", "range": (0.0, 30.0), "colors": "inferno", "format": "%.0f",
           "threshold": None},
    "Y": {"title": "Y (venous O2 saturation)", "unit": "", "range": (0.2, 1.0), "colors": "viridis",
          "format": "%.2f", "threshold": None},
    "v": {"title": "v (venous blood volume)", "unit": "", "range": (0.0, 0.1), "colors": "viridis",
          "format": "%.2f", "threshold": None},
    "chi_nb": {"title": "chi_nb", "unit": "ppm", "range": (-0.1, 0.1), "colors": "diverging", "format": "%.2f",
               "threshold": None},
    "CMRO2": {"title": "CMRO2", "unit": "umol/100g/min", "range": (0.0, 250.0), "colors": "inferno",
              "format": "%.0f", "threshold": 1e-3},
}

# Colour tables: Slicer's own (file-based, present in the application) first, else our own copy.
SLICER_COLOR_NODE_IDS = {
    "viridis": "vtkMRMLColorTableNodeFileViridis.txt",
    "inferno": "vtkMRMLColorTableNodeFileInferno.txt",
    "diverging": "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "grey": "vtkMRMLColorTableNodeGrey",
}
# 17 anchors each of matplotlib's viridis, inferno and RdBu_r (perceptually uniform / diverging).
_COLOR_ANCHORS = {
    "viridis": [(0.267, 0.005, 0.329), (0.282, 0.095, 0.417), (0.279, 0.175, 0.483), (0.259, 0.252, 0.525),
                (0.23, 0.322, 0.546), (0.199, 0.388, 0.555), (0.173, 0.449, 0.558), (0.149, 0.508, 0.557),
                (0.128, 0.567, 0.551), (0.121, 0.626, 0.533), (0.158, 0.684, 0.502), (0.246, 0.739, 0.452),
                (0.369, 0.789, 0.383), (0.516, 0.831, 0.294), (0.678, 0.864, 0.19), (0.846, 0.887, 0.1),
                (0.993, 0.906, 0.144)],
    "inferno": [(0.001, 0.0, 0.014), (0.042, 0.028, 0.141), (0.129, 0.047, 0.291), (0.238, 0.037, 0.396),
                (0.342, 0.062, 0.429), (0.441, 0.099, 0.432), (0.541, 0.135, 0.415), (0.64, 0.171, 0.381),
                (0.736, 0.216, 0.33), (0.822, 0.275, 0.266), (0.894, 0.353, 0.194), (0.947, 0.449, 0.115),
                (0.978, 0.558, 0.035), (0.988, 0.675, 0.065), (0.975, 0.798, 0.206), (0.948, 0.917, 0.411),
                (0.988, 0.998, 0.645)],
    "diverging": [(0.02, 0.188, 0.38), (0.089, 0.321, 0.565), (0.163, 0.445, 0.698), (0.247, 0.556, 0.754),
                  (0.421, 0.676, 0.819), (0.606, 0.79, 0.88), (0.761, 0.869, 0.925), (0.878, 0.926, 0.952),
                  (0.969, 0.966, 0.965), (0.984, 0.898, 0.847), (0.982, 0.801, 0.706), (0.96, 0.668, 0.536),
                  (0.895, 0.504, 0.4), (0.817, 0.332, 0.281), (0.728, 0.155, 0.197), (0.577, 0.055, 0.149),
                  (0.404, 0.0, 0.122)],
}
OWN_COLOR_NODE_NAMES = {"viridis": "OEFPredictor Viridis", "inferno": "OEFPredictor Inferno",
                        "diverging": "OEFPredictor Diverging"}

# --- Comparison with a reference map (issue 6) ----------------------------------------------------
MAX_PLOT_POINTS = 5000  # the scatter / Bland-Altman plots draw at most this many voxels (a subsample)
COMPARISON_LAYOUT_ID = 56101  # a custom layout id, away from Slicer's own (SlicerLayout* < 1000)
COMPARISON_VIEW_GROUP = 56  # the three comparison views are linked with each other only
COMPARISON_SLICE_VIEWS = (("OEFPrediction", "P", "#F34A33"), ("OEFReference", "R", "#EDD54C"),
                          ("OEFDifference", "D", "#6EB04B"))
COMPARISON_PLOT_VIEWS = ("OEFScatter", "OEFBlandAltman")
COMPARISON_TABLE_VIEW = "OEFStatistics"
COMPARISON_ROLES = {key: "OEFPredictor." + key for key in (
    "statistics", "difference", "table", "linesTable", "scatterChart", "blandAltmanChart", "scatterPoints",
    "identity", "baPoints", "baMean", "baLower", "baUpper")}


def _comparisonLayoutXml():
    def sliceView(name, label, color):
        return (f'<item><view class="vtkMRMLSliceNode" singletontag="{name}">'
                f'<property name="orientation" action="default">Axial</property>'
                f'<property name="viewlabel" action="default">{label}</property>'
                f'<property name="viewcolor" action="default">{color}</property>'
                f'<property name="viewgroup" action="default">{COMPARISON_VIEW_GROUP}</property>'
                f'</view></item>')

    top = "".join(sliceView(*view) for view in COMPARISON_SLICE_VIEWS)
    bottom = "".join(f'<item><view class="vtkMRMLPlotViewNode" singletontag="{name}">'
                     f'<property name="viewlabel" action="default">{label}</property></view></item>'
                     for name, label in zip(COMPARISON_PLOT_VIEWS, ("S", "B")))
    bottom += (f'<item><view class="vtkMRMLTableViewNode" singletontag="{COMPARISON_TABLE_VIEW}">'
               f'<property name="viewlabel" action="default">T</property></view></item>')
    return ('<layout type="vertical" split="true">'
            f'<item splitSize="600"><layout type="horizontal" split="true">{top}</layout></item>'
            f'<item splitSize="400"><layout type="horizontal" split="true">{bottom}</layout></item>'
            '</layout>')


COMPARISON_LAYOUT_XML = _comparisonLayoutXml()


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
a multi-echo gradient-echo (mGRE) <b>magnitude</b> series and a <b>QSM</b> map (ppm), with an LSTM
network (or a DNN, or a voxelwise QQ fit).
<ul>
<li><b>Echoes</b>: a sequence whose index values are the echo times, or scalar volumes ticked in echo
order. The echo times (ms) are filled from the sequence or the DICOM attributes; check them.</li>
<li><b>QSM</b> in ppm, on the same voxel grid as the echoes; optional brain mask and CBF
(mL/100 g/min, adds a CMRO2 map).</li>
<li>The model's protocol (echo times, field strength) must match the data; the bundled model was
trained on simulated 3 T data with 8 echoes (TE 4.5-39.5 ms).</li>
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

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class OEFPredictorParameterNode:
        """The panel's state, saved with the scene.

        echoSource: "sequence" (echoSequence) or "volumes" (echoVolumes, in echo order; there is no
        GUI connector for a list of nodes, so the widget keeps it in sync by hand).
        """

        echoSource: Annotated[str, Choice(["sequence", "volumes"]), Default("sequence")]
        echoSequence: slicer.vtkMRMLSequenceNode
        echoVolumes: list[slicer.vtkMRMLScalarVolumeNode]
        qsm: slicer.vtkMRMLScalarVolumeNode
        mask: slicer.vtkMRMLScalarVolumeNode
        cbf: slicer.vtkMRMLScalarVolumeNode
        echoTimesMs: str
        fieldStrength: Annotated[float, WithinRange(0.1, 21.0), Default(3.0)]
        useBundledModel: Annotated[bool, Default(True)]
        modelPath: str
        device: Annotated[str, Choice(list(DEVICES)), Default("auto")]
        method: Annotated[str, Choice(list(METHODS)), Default("lstm")]
        outputOEF: slicer.vtkMRMLScalarVolumeNode
        outputS0: slicer.vtkMRMLScalarVolumeNode
        outputR2: slicer.vtkMRMLScalarVolumeNode
        outputY: slicer.vtkMRMLScalarVolumeNode
        outputV: slicer.vtkMRMLScalarVolumeNode
        outputChinb: slicer.vtkMRMLScalarVolumeNode
        opacity: Annotated[float, WithinRange(0.0, 1.0), Default(0.6)]

else:
    OEFPredictorParameterNode = None

OUTPUT_FIELDS = {"OEF": "outputOEF", "S0": "outputS0", "R2": "outputR2", "Y": "outputY", "v": "outputV",
                 "chi_nb": "outputChinb"}


#
# OEFPredictorWidget
#


class OEFPredictorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: thin; state in the parameter node, work in the Logic."""

    POLL_INTERVAL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._timer = None
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

        self.ui.deviceComboBox.clear()
        for device, label in (("auto", _("Automatic (GPU if available)")), ("cpu", _("CPU")), ("gpu", _("GPU"))):
            self.ui.deviceComboBox.addItem(label, device)
        self.ui.methodComboBox.clear()
        for method, label in (("lstm", _("LSTM (paper)")), ("dnn", _("DNN (voxelwise)")),
                              ("nlls", _("QQ fit (NLLS)")), ("cat", _("QQ fit (CAT)")),
                              ("ccm", _("QQ fit (CCM)"))):
            self.ui.methodComboBox.addItem(label, method)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(False)

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onPollTimer)

        # Everything that changes whether Apply makes sense
        for selector in (self.ui.echoSequenceSelector, self.ui.qsmSelector, self.ui.maskSelector,
                         self.ui.cbfSelector):
            selector.currentNodeChanged.connect(self.onInputChanged)
        self.ui.echoSequenceSelector.currentNodeChanged.connect(self.onEchoSourceNodesChanged)
        self.ui.echoVolumesSelector.checkedNodesChanged.connect(self.onEchoSourceNodesChanged)
        self.ui.echoSequenceRadioButton.toggled.connect(self.onEchoSourceToggled)
        self.ui.echoVolumesRadioButton.toggled.connect(self.onEchoSourceToggled)
        self.ui.echoTimesLineEdit.textChanged.connect(self.onInputChanged)
        self.ui.bundledModelRadioButton.toggled.connect(self.onModelChanged)
        self.ui.modelFileRadioButton.toggled.connect(self.onModelChanged)
        self.ui.modelPathLineEdit.currentPathChanged.connect(self.onModelChanged)
        self.ui.methodComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.detectBackendButton.clicked.connect(self.onDetectBackend)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        # ROI statistics and comparison with a reference (issue 6): the work is in the Logic
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
        if self._run is not None:
            self._run.cancel()
        if self._timer is not None:
            self._timer.stop()

    def enter(self):
        if IN_SLICER_APP:
            self.initializeParameterNode()

    def exit(self):
        if self._parameterNode and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        if self._run is not None:
            self._run.cancel()
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
            # radio buttons and data-carrying combo boxes have no connector either
            p = self._parameterNode
            self.ui.echoVolumesRadioButton.setChecked(p.echoSource == "volumes")
            self.ui.echoSequenceRadioButton.setChecked(p.echoSource != "volumes")
            self.ui.bundledModelRadioButton.setChecked(bool(p.useBundledModel))
            self.ui.modelFileRadioButton.setChecked(not p.useBundledModel)
            for combo, value in ((self.ui.deviceComboBox, p.device), (self.ui.methodComboBox, p.method)):
                index = combo.findData(value)
                if index >= 0:
                    combo.setCurrentIndex(index)
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
        return parseEchoTimes(_prop(self.ui.echoTimesLineEdit, "text"))

    def modelChoice(self):
        method = _prop(self.ui.methodComboBox, "currentData")
        if method not in METHODS_WITH_MODEL:
            return None
        if self.ui.bundledModelRadioButton.isChecked():
            return "bundled:" + METHODS_WITH_MODEL[method]
        return _prop(self.ui.modelPathLineEdit, "currentPath") or ""

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
        model = self.modelChoice()
        if model is not None and model.startswith("bundled:"):
            try:
                resourcePath("Models", model.split(":", 1)[1])
            except FileNotFoundError:
                missing.append(_("The bundled model is not installed; choose a model file."))
        elif model is not None:
            if not model:
                missing.append(_("Choose a model file (.keras, with its .json card beside it)."))
            elif not os.path.isfile(model) or not os.path.isfile(os.path.splitext(model)[0] + ".json"):
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
        """Fill the echo times from the sequence index or the volumes' DICOM attributes."""
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
        self.updateApplyState()

    def onModelChanged(self, *args):
        method = _prop(self.ui.methodComboBox, "currentData")
        needsModel = method in METHODS_WITH_MODEL
        for w in (self.ui.bundledModelRadioButton, self.ui.modelFileRadioButton):
            w.setEnabled(needsModel)
        self.ui.modelPathLineEdit.setEnabled(needsModel and self.ui.modelFileRadioButton.isChecked())
        self.ui.modelInfoLabel.setText(self.logic.modelSummary(self.modelChoice(), method))
        if self._parameterNode:
            self._parameterNode.useBundledModel = self.ui.bundledModelRadioButton.isChecked()
            self._parameterNode.method = method
        self.updateApplyState()

    def onInputChanged(self, *args):
        self.updateApplyState()

    def updateApplyState(self):
        if self._run is not None:  # running: the button is Cancel
            return
        missing = self.missingInputs()
        self.ui.applyButton.setEnabled(not missing)
        if missing:
            self.ui.applyButton.setToolTip(_("Cannot run yet:") + "\n- " + "\n- ".join(missing))
        else:
            self.ui.applyButton.setToolTip(_("Compute the OEF and parameter maps in the background."))

    def onDeviceChanged(self, *args):
        if self._parameterNode:
            self._parameterNode.device = _prop(self.ui.deviceComboBox, "currentData")

    def onDetectBackend(self, *args):
        self.ui.backendInfoLabel.setText(self.logic.backendSummary(detect=True))

    # --- ROI statistics and comparison (issue 6) --------------------------------------------------
    def outputMapNodes(self):
        """{map name: node} of the output selectors that hold a volume."""
        nodes = {name: getattr(self.ui, f"output{field[len('output'):]}Selector").currentNode()
                 for name, field in OUTPUT_FIELDS.items()}
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
            if IN_SLICER_APP:
                slicer.util.errorDisplay(str(exc))
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
            if IN_SLICER_APP:
                slicer.util.errorDisplay(str(exc))
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
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.setText(_("Cancelling after the current chunk..."))
            self.ui.applyButton.setEnabled(False)
            return
        method = _prop(self.ui.methodComboBox, "currentData")
        if method in METHODS_WITH_MODEL and not self.logic.ensureDependencies(ask=True):
            self.ui.statusLabel.setText(_("TensorFlow is not installed; see the message for what to do."))
            return
        outputs = {name: getattr(self.ui, f"output{suffix}Selector").currentNode()
                   for name, suffix in (("OEF", "OEF"), ("S0", "S0"), ("R2", "R2"), ("Y", "Y"), ("v", "V"),
                                        ("chi_nb", "Chinb"))}
        model = self.modelChoice()
        if model is not None and model.startswith("bundled:"):
            model = str(resourcePath("Models", model.split(":", 1)[1]))
        self.lastOutputs = None
        self.lastError = None
        try:
            self._run = self.logic.startPrediction(
                self.echoInput(), self.ui.qsmSelector.currentNode(), mask=self.ui.maskSelector.currentNode(),
                cbf=self.ui.cbfSelector.currentNode(), echoTimesMs=self.echoTimesMs(),
                fieldStrength=_prop(self.ui.fieldStrengthSpinBox, "value"), model=model,
                device=_prop(self.ui.deviceComboBox, "currentData"), method=method, outputNodes=outputs,
                opacity=_prop(self.ui.opacitySliderWidget, "value"))
        except InputError as exc:
            self.lastError = exc
            self._showError(str(exc))
            return
        self.ui.applyButton.setText(_("Cancel"))
        self.ui.applyButton.setToolTip(_("Stop the computation; nothing is written."))
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self.ui.statusLabel.setText(_("Starting..."))
        self._timer.start()

    def onPollTimer(self):
        run = self._run
        if run is None:
            self._timer.stop()
            return
        fraction, message = run.progress()
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        if message:
            self.ui.statusLabel.setText(message)
        if not run.done:
            return
        self._timer.stop()
        try:
            self.lastOutputs = run.finish()
        except CancelledError:
            self.ui.statusLabel.setText(_("Cancelled; no volume was created or changed."))
        except Exception as exc:  # shown to the user; details in the log
            self.lastError = exc
            logging.exception("OEFPredictor failed")
            self._showError(str(exc))
        else:
            for name, node in self.lastOutputs.items():
                if name in OUTPUT_FIELDS:
                    suffix = OUTPUT_FIELDS[name][len("output"):]
                    getattr(self.ui, f"output{suffix}Selector").setCurrentNode(node)
            self.ui.progressBar.setValue(100)
            self.ui.statusLabel.setText(run.summary())
        finally:
            self._run = None
            self.ui.applyButton.setText(_("Apply"))
            self.updateApplyState()

    def _showError(self, message):
        self.ui.statusLabel.setText(_("Failed: ") + message.splitlines()[0][:200])
        if IN_SLICER_APP:
            slicer.util.errorDisplay(message)


#
# Helpers (pure, no Qt)
#


def _prop(widget, name):
    """A Qt property's value: PythonQt (Slicer) exposes properties as attributes (widget.text),
    PySide6 (the widget tests) as getter methods (widget.text()); this reads both."""
    value = getattr(widget, name)
    return value() if callable(value) else value


def parseEchoTimes(text):
    """'4.5, 9.5 14.5' -> [4.5, 9.5, 14.5] (ms); InputError with what is wrong."""
    parts = [p for p in (text or "").replace(";", ",").replace(",", " ").split() if p]
    if not parts:
        raise InputError(_("Type the echo times in ms, e.g. 4.5, 9.5, 14.5."))
    try:
        tes = [float(p) for p in parts]
    except ValueError:
        raise InputError(_("Echo times must be numbers in ms, separated by commas.")) from None
    if any(not np.isfinite(t) or t <= 0 for t in tes) or any(b <= a for a, b in zip(tes, tes[1:])):
        raise InputError(_("Echo times must be positive and increasing (ms)."))
    if max(tes) < 1.0:
        raise InputError(_("Echo times look like seconds; type them in milliseconds."))
    return tes


def echoCount(echoes):
    if echoes is None:
        return 0
    if isinstance(echoes, (list, tuple)):
        return len(echoes)
    return echoes.GetNumberOfDataNodes()


def _matrixArray(volumeNode):
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m).copy()


def _fillTable(tableNode, columns):
    """Replace a table node's columns with these float64 columns (name -> 1D array)."""
    with slicer.util.NodeModify(tableNode):
        tableNode.RemoveAllColumns()
        for name, values in columns.items():
            array = vtk.vtkDoubleArray()
            array.SetName(name)
            values = np.ascontiguousarray(values, dtype=np.float64)
            array.SetNumberOfValues(values.size)
            for i, value in enumerate(values):
                array.SetValue(i, float(value))
            tableNode.GetTable().AddColumn(array)
    return tableNode


def _interpolateAnchors(anchors, n=256):
    anchors = np.asarray(anchors, dtype=float)
    x = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, x, anchors[:, c]) for c in range(3)], axis=1)


#
# OEFPredictorLogic
#


class OEFPredictorRun:
    """A prediction running in the background (returned by OEFPredictorLogic.startPrediction).

    progress() -> (fraction, message), done, cancel(), wait() and finish() -> {map name: node}.
    Nothing in the scene changes until finish() is called after success (main thread only).
    """

    def __init__(self, logic, job, context):
        self.logic = logic
        self.job = job
        self.context = context
        self._fraction = 0.0
        self._message = ""
        self.outputs = None

    def progress(self):
        for fraction, message in self.job.poll_events():
            self._fraction, self._message = float(fraction), str(message)
        return self._fraction, self._message

    @property
    def done(self):
        return bool(self.job.done)

    def cancel(self):
        self.job.cancel()

    def wait(self, timeout=None):
        """Block until the job ends (scripts, tests); then write the outputs (see finish)."""
        try:
            self.job.wait(timeout)
        except Exception:  # finish() re-raises the job's error on the main thread
            pass
        return self.finish()

    def finish(self):
        """Write the maps into MRML (main thread). Raises CancelledError or the job's error;
        then the scene is untouched."""
        if self.outputs is not None:
            return self.outputs
        if not self.job.done:
            raise RuntimeError("The prediction is still running; call finish() once done is True.")
        if self.job.cancelled:
            raise CancelledError("The prediction was cancelled; nothing was written.")
        if self.job.error is not None:
            raise self.job.error
        self.outputs = self.logic.writeOutputs(self.job.result, self.context)
        return self.outputs

    def summary(self):
        result = self.job.result
        if result is None:
            return ""
        text = _("Done: {n:,} voxels in {s:.1f} s on the {d}.").format(
            n=int(getattr(result, "n_voxels", 0) or np.count_nonzero(result.mask)), s=float(result.elapsed_s),
            d=str(result.device).upper())
        if getattr(result, "warnings", None):
            text += " " + " ".join(str(w) for w in result.warnings)[:300]
        return text


class OEFPredictorLogic(ScriptedLoadableModuleLogic):
    """MRML nodes in, MRML nodes out; usable from Python without the panel.

    One call does it all::

        logic = OEFPredictorLogic()
        outputs = logic.process(echoSequenceNode, qsmNode)   # waits; {"OEF": node, "S0": node, ...}

    or, without blocking: run = logic.startPrediction(...); poll run.progress() / run.done from a
    QTimer; run.finish() writes the outputs; run.cancel() stops between chunks.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._comparisonSliceLogics = []  # slice logics made outside the application (no views)

    def getParameterNode(self):
        return ScriptedLoadableModuleLogic.getParameterNode(self)

    # --- echo times -------------------------------------------------------------------------------
    def echoTimesFromNodes(self, echoes):
        """Echo times in ms from a sequence's index values, or from volumes' DICOM echo times;
        None when unknown."""
        if echoes is None:
            return None
        if isinstance(echoes, (list, tuple)):
            tes = [self._volumeEchoTimeMs(node) for node in echoes]
            return None if any(t is None for t in tes) else tes
        n = echoes.GetNumberOfDataNodes()
        try:
            values = [float(echoes.GetNthIndexValue(i)) for i in range(n)]
        except ValueError:
            return None
        unit = (echoes.GetIndexUnit() or "").strip().lower()
        if unit in ("s", "sec", "second", "seconds") or (unit not in ("ms", "msec") and values and max(values) < 1.0):
            values = [v * 1000.0 for v in values]
        if not values or values[0] <= 0 or any(b <= a for a, b in zip(values, values[1:])):
            return None  # not echo times (e.g. a 4D NIfTI's frame numbers 0, 1, 2...)
        return [round(v, 6) for v in values]

    @staticmethod
    def _volumeEchoTimeMs(node):
        for attribute in ("DICOM.EchoTime", "EchoTime"):
            value = node.GetAttribute(attribute)
            if value:
                try:
                    return float(value)
                except ValueError:
                    pass
        uids = node.GetAttribute("DICOM.instanceUIDs")
        db = getattr(slicer, "dicomDatabase", None)
        if uids and db is not None:
            try:
                value = db.fileValue(db.fileForInstance(uids.split()[0]), "0018,0081")
                return float(value) if value else None
            except Exception:
                return None
        return None

    # --- inputs -----------------------------------------------------------------------------------
    def echoVolumeNodes(self, echoes):
        """The echo volumes (sequence data nodes or the given list), in echo order."""
        if echoes is None:
            raise InputError(_("No echo volumes given."))
        if isinstance(echoes, (list, tuple)):
            nodes = list(echoes)
        elif echoes.IsA("vtkMRMLSequenceNode"):
            nodes = [echoes.GetNthDataNode(i) for i in range(echoes.GetNumberOfDataNodes())]
        else:
            raise InputError(_("The echoes must be a sequence node or a list of scalar volume nodes."))
        for i, node in enumerate(nodes):
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.GetImageData() is None:
                raise InputError(_("Echo {i} is not a scalar volume with voxels.").format(i=i + 1))
        if len(nodes) < 2:
            raise InputError(_("At least two echoes are needed, got {n}.").format(n=len(nodes)))
        return nodes

    def collectInputs(self, echoes, qsm, mask=None, cbf=None, echoTimesMs=None, fieldStrength=3.0):
        """Copy the arrays out of MRML (main thread): (PredictionInputs, context for the outputs).

        Refuses, with what to do, inputs that do not share the echoes' voxel grid."""
        from OEFPredictorLib import physics
        from OEFPredictorLib.predict import PredictionInputs

        nodes = self.echoVolumeNodes(echoes)
        if qsm is None:
            raise InputError(_("No QSM volume given."))
        reference = nodes[0]
        refMatrix = _matrixArray(reference)
        refDims = reference.GetImageData().GetDimensions()
        refTransform = self._parentTransformID(reference, echoes)
        named = [(_("echo {i}").format(i=i + 1), n) for i, n in enumerate(nodes)] + [(_("QSM"), qsm)]
        if mask is not None:
            named.append((_("mask"), mask))
        if cbf is not None:
            named.append((_("CBF"), cbf))
        for label, node in named:
            if node.GetImageData() is None:
                raise InputError(_("The {label} volume '{name}' has no voxels.").format(label=label, name=node.GetName()))
            dims = node.GetImageData().GetDimensions()
            if node.GetImageData().GetNumberOfScalarComponents() != 1:
                raise InputError(_("The {label} volume '{name}' has several components per voxel; give a "
                                   "scalar volume.").format(label=label, name=node.GetName()))
            if tuple(dims) != tuple(refDims) or not np.allclose(_matrixArray(node), refMatrix, atol=1e-4, rtol=1e-5):
                raise InputError(_(
                    "The {label} volume '{name}' is not on the same voxel grid as echo 1 (size {d} vs {rd}, or a "
                    "different IJK-to-RAS: origin, spacing or directions). All inputs must share echo 1's grid: "
                    "resample it onto echo 1 first (Resample Image (BRAINS) or Volumes > Resample).").format(
                        label=label, name=node.GetName(), d="x".join(map(str, dims)),
                        rd="x".join(map(str, refDims))))
            tid = self._parentTransformID(node, echoes if node in nodes else None)
            if tid != refTransform:
                raise InputError(_("The {label} volume '{name}' is under a different transform than echo 1. "
                                   "Harden or remove the transforms (Data module) so that all inputs share one "
                                   "grid.").format(label=label, name=node.GetName()))
        if echoTimesMs is None:
            echoTimesMs = self.echoTimesFromNodes(echoes)
            if echoTimesMs is None:
                raise InputError(_("The echo times are unknown; give them in ms (echoTimesMs)."))
        if len(echoTimesMs) != len(nodes):
            raise InputError(_("{n} echo volumes but {m} echo times; give one echo time (ms) per echo.").format(
                n=len(nodes), m=len(echoTimesMs)))
        try:
            protocol = physics.Protocol.from_milliseconds(list(echoTimesMs), float(fieldStrength))
        except ValueError as exc:
            raise InputError(str(exc)) from None

        echoArray = np.stack([np.asarray(slicer.util.arrayFromVolume(n), dtype=np.float32) for n in nodes], axis=-1)
        qsmArray = np.array(slicer.util.arrayFromVolume(qsm), dtype=np.float32)
        maskArray = None if mask is None else np.array(slicer.util.arrayFromVolume(mask)) > 0
        cbfArray = None if cbf is None else np.array(slicer.util.arrayFromVolume(cbf), dtype=np.float32)
        inputs = PredictionInputs(echoes=echoArray, qsm=qsmArray, protocol=protocol, mask=maskArray, cbf=cbfArray)
        context = {
            "ijkToRAS": refMatrix,
            "transformID": refTransform,
            "background": self._echoOneDisplayNode(echoes, nodes),
            "baseName": (echoes.GetName() if not isinstance(echoes, (list, tuple)) else nodes[0].GetName()) or "OEF",
        }
        return inputs, context

    @staticmethod
    def _parentTransformID(node, sequence=None):
        # sequence data nodes live in the sequence's own scene: the proxy node's transform counts
        if node.GetScene() is not slicer.mrmlScene:
            shown = OEFPredictorLogic._echoOneDisplayNode(sequence, [node]) if sequence is not None else None
            return shown["proxy"].GetTransformNodeID() if shown else None
        return node.GetTransformNodeID()

    @staticmethod
    def _echoOneDisplayNode(echoes, nodes):
        """The scene node that shows echo 1: the volume itself, or the sequence's proxy node (the
        sequence browser is moved to the first echo)."""
        if isinstance(echoes, (list, tuple)):
            return nodes[0]
        scene = slicer.mrmlScene
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
            browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
            if browser.IsSynchronizedSequenceNode(echoes, True):
                proxy = browser.GetProxyNode(echoes)
                if proxy is not None:
                    return {"browser": browser, "proxy": proxy}
        return None

    # --- running ----------------------------------------------------------------------------------
    def startPrediction(self, echoes, qsm, mask=None, cbf=None, echoTimesMs=None, fieldStrength=3.0, model=None,
                        device="auto", method="lstm", outputNodes=None, opacity=0.6):
        """Copy the inputs out of MRML and start the engine in a background thread.

        echoes: a vtkMRMLSequenceNode (index values = echo times) or a list of scalar volume nodes in
        echo order. model: None (bundled), a .keras path (with its .json card) or a ModelBundle.
        outputNodes: {map name: existing scalar volume node to overwrite}; missing ones are created
        (only on success). Returns an OEFPredictorRun."""
        from OEFPredictorLib.predict import PredictionJob

        if method not in METHODS:
            raise InputError(_("Unknown method {m!r}; choose one of {ms}.").format(m=method, ms=", ".join(METHODS)))
        if device not in DEVICES:
            raise InputError(_("Unknown device {d!r}; choose auto, cpu or gpu.").format(d=device))
        inputs, context = self.collectInputs(echoes, qsm, mask, cbf, echoTimesMs, fieldStrength)
        outputNodes = dict(outputNodes or {})
        for name, node in outputNodes.items():
            if node is not None and not node.IsA("vtkMRMLScalarVolumeNode"):
                raise InputError(_("The output for {name} must be a scalar volume node.").format(name=name))
            if node is not None and (node in self.echoVolumeNodes(echoes) or node in (qsm, mask, cbf)):
                raise InputError(_("The output for {name} is one of the inputs; choose another volume or create "
                                   "a new one.").format(name=name))
        chosen = [node for node in outputNodes.values() if node is not None]
        if len({node.GetID() for node in chosen}) < len(chosen):
            raise InputError(_("The same volume is chosen as the output of two maps; choose one volume per map "
                               "(or create new ones)."))
        context["outputNodes"] = outputNodes
        context["opacity"] = float(opacity)
        job = PredictionJob(inputs, model=model, device=device, method=method)
        job.start()
        return OEFPredictorRun(self, job, context)

    def process(self, echoes, qsm, mask=None, cbf=None, echoTimesMs=None, fieldStrength=3.0, model=None,
                device="auto", method="lstm", outputNodes=None, opacity=0.6, wait=True, timeout=None):
        """Predict OEF and the QQ parameter maps from MRML nodes.

        wait=True (default): blocks until done and returns {map name: output volume node}
        (OEF, S0, R2, Y, v, chi_nb, and CMRO2 when a CBF volume is given); raises CancelledError or
        InputError without touching the scene. wait=False: returns the OEFPredictorRun."""
        run = self.startPrediction(echoes, qsm, mask=mask, cbf=cbf, echoTimesMs=echoTimesMs,
                                   fieldStrength=fieldStrength, model=model, device=device, method=method,
                                   outputNodes=outputNodes, opacity=opacity)
        if not wait:
            return run
        return run.wait(timeout)

    # --- outputs ----------------------------------------------------------------------------------
    def writeOutputs(self, result, context):
        """Write a finished PredictionResult into volume nodes (main thread).

        Nodes are created only here, after success; if writing fails, every node added here is
        removed again and existing nodes get their voxels, geometry and transform back."""
        scene = slicer.mrmlScene
        maps = result.maps
        names = [n for n in MAP_NAMES + OPTIONAL_MAP_NAMES if n in maps]
        missing = [n for n in MAP_NAMES if n not in maps]
        if missing:
            raise RuntimeError(f"The engine returned no {', '.join(missing)} map.")
        outputNodes = context["outputNodes"]
        resultMask = getattr(result, "mask", None)
        resultMask = None if resultMask is None else np.asarray(resultMask, dtype=bool)
        idsBefore = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        written = {}
        saved = []  # (node, image data copy, IJK-to-RAS, transform ID) of the existing nodes we overwrite
        try:
            for name in names:
                array = np.asarray(maps[name], dtype=np.float32)
                node = outputNodes.get(name)
                if node is not None:
                    saved.append(self._snapshotVolume(node))
                else:
                    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                   scene.GenerateUniqueName(f"{context['baseName']} {name}"))
                written[name] = (node, array)
            for name, (node, array) in written.items():
                node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(context["ijkToRAS"]))
                node.SetAndObserveTransformNodeID(context["transformID"])
                slicer.util.updateVolumeFromArray(node, array)
                unit = MAP_DISPLAY[name]["unit"]
                node.SetAttribute("OEFPredictor.Map", name)
                node.SetAttribute("OEFPredictor.Unit", unit)
                node.SetVoxelValueUnits(self._unitsCode(unit)) if hasattr(node, "SetVoxelValueUnits") else None
                self.setMapDisplay(node, name, array, resultMask)
        except Exception:
            # Every node added since the start (volumes, display, colour and legend nodes) goes again.
            newIds = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
            for nodeId in reversed([i for i in newIds if i not in idsBefore]):
                node = scene.GetNodeByID(nodeId)
                if node is not None:
                    scene.RemoveNode(node)
            for snapshot in saved:
                self._restoreVolume(*snapshot)
            raise
        outputs = {name: node for name, (node, _array) in written.items()}
        self.showOverlay(outputs["OEF"], context.get("background"), context.get("opacity", 0.6))
        return outputs

    @staticmethod
    def _snapshotVolume(node):
        imageData = None
        if node.GetImageData() is not None:
            imageData = vtk.vtkImageData()
            imageData.DeepCopy(node.GetImageData())
        ijkToRAS = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijkToRAS)
        return node, imageData, ijkToRAS, node.GetTransformNodeID()

    @staticmethod
    def _restoreVolume(node, imageData, ijkToRAS, transformID):
        node.SetAndObserveImageData(imageData)
        node.SetIJKToRASMatrix(ijkToRAS)
        node.SetAndObserveTransformNodeID(transformID)

    @staticmethod
    def _unitsCode(unit):
        code = slicer.vtkCodedEntry()
        code.SetValueSchemeMeaning(unit or "1", "UCUM", unit or "no units")
        return code

    def colorNodeID(self, kind):
        """Slicer's colour table of this kind when the application has it, else our own copy."""
        scene = slicer.mrmlScene
        nodeID = SLICER_COLOR_NODE_IDS.get(kind)
        if nodeID and scene.GetNodeByID(nodeID) is not None:
            return nodeID
        if kind == "grey":
            return "vtkMRMLColorTableNodeGrey"
        name = OWN_COLOR_NODE_NAMES[kind]
        existing = scene.GetFirstNode(name, "vtkMRMLColorTableNode")
        if existing is not None:
            return existing.GetID()
        colors = _interpolateAnchors(_COLOR_ANCHORS[kind])
        node = slicer.vtkMRMLColorTableNode()
        node.SetName(name)
        node.SetTypeToUser()
        node.SetNumberOfColors(len(colors))
        node.GetLookupTable().SetTableRange(0, len(colors) - 1)
        for i, (r, g, b) in enumerate(colors):
            node.SetColor(i, r, g, b, 1.0)
        node.SetAttribute("Category", "OEFPredictor")
        node.SetHideFromEditors(False)
        scene.AddNode(node)
        return node.GetID()

    def setMapDisplay(self, node, name, array, mask=None):
        """Colour table, fixed window, background thresholded away."""
        spec = MAP_DISPLAY[name]
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        inside = array[mask] if mask is not None and mask.shape == array.shape else array[array != 0]
        inside = inside[np.isfinite(inside)]
        lo, hi = spec["range"] or (
            (float(np.percentile(inside, 1)), float(np.percentile(inside, 99))) if inside.size else (0.0, 1.0))
        display.SetAndObserveColorNodeID(self.colorNodeID(spec["colors"]))
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(lo, hi)
        threshold = spec["threshold"]
        background = None
        if mask is not None and mask.shape == array.shape and (~mask).any():
            background = float(np.median(array[~mask]))
        if threshold is None and background is not None and inside.size and background < inside.min():
            threshold = background + 1e-6 * max(1.0, abs(background))
        display.SetAutoThreshold(False)
        if threshold is not None:
            display.SetThreshold(threshold, max(float(np.nanmax(array)) if array.size else hi, hi) + 1.0)
            display.SetApplyThreshold(True)
        else:
            display.SetApplyThreshold(False)
        display.SetInterpolate(False)

    def colorLogic(self):
        modules = getattr(slicer, "modules", None)
        if modules is not None and hasattr(modules, "colors"):
            return modules.colors.logic()
        app = getattr(slicer, "app", None)
        return app.applicationLogic().GetModuleLogic("Colors") if app is not None else None

    def showOverlay(self, oefNode, background, opacity):
        """OEF as the foreground over echo 1 in every slice view, with a colour legend (with units)."""
        if isinstance(background, dict):  # a sequence: show its first echo through the proxy node
            background["browser"].SetSelectedItemNumber(0)
            background = background["proxy"]
        kwargs = {"foreground": oefNode, "foregroundOpacity": float(opacity)}
        if background is not None:
            kwargs["background"] = background
        slicer.util.setSliceViewerLayers(**kwargs)
        colorLogic = self.colorLogic()
        if colorLogic is not None:
            legend = colorLogic.AddDefaultColorLegendDisplayNode(oefNode)
            if legend is not None:
                spec = MAP_DISPLAY["OEF"]
                legend.SetTitleText(f"{spec['title']} ({spec['unit']})")
                legend.SetLabelFormat(spec["format"])
                legend.SetVisibility(True)
        return oefNode

    # --- ROI statistics (issue 6) -----------------------------------------------------------------
    def roisFromNode(self, roiNode, referenceVolume):
        """{name: boolean array on referenceVolume's grid} from a segmentation (each segment,
        resampled onto the volume), a labelmap on the same grid, or a markups ROI box."""
        from OEFPredictorLib import roistats

        shape = slicer.util.arrayFromVolume(referenceVolume).shape
        if roiNode.IsA("vtkMRMLSegmentationNode"):
            return self._segmentMasks(roiNode, referenceVolume)
        if roiNode.IsA("vtkMRMLLabelMapVolumeNode"):
            if (slicer.util.arrayFromVolume(roiNode).shape != shape
                    or not np.allclose(_matrixArray(roiNode), _matrixArray(referenceVolume), atol=1e-4)):
                raise InputError(_("The labelmap '{name}' is not on the maps' voxel grid; resample it or use a "
                                   "segmentation.").format(name=roiNode.GetName()))
            names = {}
            colorNode = roiNode.GetDisplayNode().GetColorNode() if roiNode.GetDisplayNode() else None
            if colorNode is not None and colorNode.GetSingletonTag():
                colorNode = None  # Slicer's built-in label tables name colours, not these regions
            labels = np.array(slicer.util.arrayFromVolume(roiNode))
            for value in np.unique(labels):
                if value and colorNode is not None and colorNode.GetColorName(int(value)):
                    names[int(value)] = colorNode.GetColorName(int(value))
            return roistats.rois_from_labels(labels, names)
        if roiNode.IsA("vtkMRMLMarkupsROINode"):
            center = [0.0, 0.0, 0.0]
            roiNode.GetCenterWorld(center)
            axes = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToWorldMatrix())[:3, :3]
            return {roiNode.GetName(): roistats.box_roi(shape, _matrixArray(referenceVolume), center,
                                                        list(roiNode.GetSize()), axes=axes)}
        raise InputError(_("ROIs come from a segmentation, a labelmap or a markups ROI."))

    def _segmentMasks(self, segmentationNode, referenceVolume):
        """{segment name: boolean array on referenceVolume's grid}.

        A segment stored as a binary labelmap is resampled onto the volume (nearest neighbour: a
        voxel belongs to the segment when its centre lies in one of the segment's voxels), whatever
        its grid (spacing, origin, directions, transforms). A segment whose source is a closed
        surface (or another non-labelmap representation) is rasterized directly on the volume's
        grid, in a temporary copy of the segmentation: converting it through the segmentation's
        own reference geometry (often another, coarser series) and then resampling would move its
        border by up to a coarse voxel. The user's segmentation is not changed."""
        segmentation = segmentationNode.GetSegmentation()
        source = segmentationNode
        temporary = None
        labelmapName = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
        if segmentation.GetNumberOfSegments() and segmentation.GetSourceRepresentationName() != labelmapName:
            temporary = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__OEFPredictor_temp__")
            temporary.SetHideFromEditors(True)
            temporary.GetSegmentation().DeepCopy(segmentation)
            temporary.GetSegmentation().RemoveRepresentation(labelmapName)
            temporary.SetAndObserveTransformNodeID(segmentationNode.GetTransformNodeID())
            # the volume's grid in the segmentation's coordinates (the export maps it back)
            temporary.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
            if not temporary.GetSegmentation().CreateRepresentation(labelmapName, True):
                slicer.mrmlScene.RemoveNode(temporary)
                raise InputError(_("The segmentation '{name}' cannot be converted to a labelmap.").format(
                    name=segmentationNode.GetName()))
            source = temporary
        scene = slicer.mrmlScene
        try:
            rois = {}
            for i in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(i)
                # as slicer.util.arrayFromSegmentBinaryLabelmap, but leaving no node behind (it
                # leaves the temporary labelmap's display node in the scene)
                before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
                labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__OEFPredictor_temp__")
                try:
                    ids = vtk.vtkStringArray()
                    ids.InsertNextValue(segmentId)
                    logic = slicer.modules.segmentations.logic()
                    if not logic.ExportSegmentsToLabelmapNode(source, ids, labelmap, referenceVolume):
                        raise InputError(_("The segment '{name}' cannot be resampled onto the maps' grid.").format(
                            name=segmentation.GetSegment(segmentId).GetName()))
                    array = np.array(slicer.util.arrayFromVolume(labelmap)) > 0
                finally:
                    added = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
                    for node in added:
                        if node.GetID() not in before:
                            scene.RemoveNode(node)
                rois[segmentation.GetSegment(segmentId).GetName()] = array
            return rois
        finally:
            if temporary is not None:
                if temporary.GetDisplayNode() is not None:
                    scene.RemoveNode(temporary.GetDisplayNode())
                scene.RemoveNode(temporary)

    def computeRoiStatistics(self, mapNodes, roiNode, referenceNodes=None, maskNode=None, tableNode=None):
        """Exact ROI statistics (OEFPredictorLib.roistats) of the maps into a table node (one row per
        ROI and map; columns as roistats.COLUMNS). A given tableNode is updated, not duplicated."""
        from OEFPredictorLib import roistats

        names = [n for n in roistats.MAP_ORDER if n in mapNodes] + [n for n in mapNodes if n not in roistats.MAP_ORDER]
        first = mapNodes[names[0]]
        maps = {n: np.array(slicer.util.arrayFromVolume(mapNodes[n]), dtype=np.float64) for n in names}
        reference = {n: np.array(slicer.util.arrayFromVolume(node), dtype=np.float64)
                     for n, node in (referenceNodes or {}).items() if node is not None}
        for label, node in [(n, mapNodes[n]) for n in names] + list((referenceNodes or {}).items()) + [("mask", maskNode)]:
            if node is not None and not np.allclose(_matrixArray(node), _matrixArray(first), atol=1e-4):
                raise InputError(_("The {label} volume is not on the maps' voxel grid.").format(label=label))
        mask = None if maskNode is None else np.array(slicer.util.arrayFromVolume(maskNode)) > 0
        rois = self.roisFromNode(roiNode, first)
        spacing = first.GetSpacing()
        rows = roistats.roi_statistics(maps, rois, roistats.voxel_volume_ml(spacing), mask=mask,
                                       reference=reference or None, contrasts=roistats.contralateral_pairs(rois),
                                       units={n: MAP_DISPLAY.get(n, {}).get("unit", "") for n in names})
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode",
                                                           slicer.mrmlScene.GenerateUniqueName("OEF ROI statistics"))
        table = tableNode.GetTable()
        with slicer.util.NodeModify(tableNode):
            tableNode.RemoveAllColumns()
            for column in roistats.COLUMNS:
                if column in roistats.TEXT_COLUMNS:
                    array = vtk.vtkStringArray()
                elif column in roistats.INT_COLUMNS:
                    array = vtk.vtkIntArray()
                else:
                    array = vtk.vtkDoubleArray()
                array.SetName(column)
                for row in rows:
                    value = row[column]
                    if column in roistats.TEXT_COLUMNS:
                        array.InsertNextValue("" if value is None else str(value))
                    elif column in roistats.INT_COLUMNS:
                        array.InsertNextValue(int(value))
                    else:
                        array.InsertNextValue(float("nan") if value is None else float(value))
                table.AddColumn(array)
        return tableNode

    def differenceMap(self, mapNode, referenceNode, outputNode=None):
        """Prediction minus reference in a volume node, with a diverging colour table centred on 0."""
        from OEFPredictorLib import roistats

        if not np.allclose(_matrixArray(mapNode), _matrixArray(referenceNode), atol=1e-4):
            raise InputError(_("The reference volume is not on the map's voxel grid."))
        diff = roistats.difference_map(slicer.util.arrayFromVolume(mapNode), slicer.util.arrayFromVolume(referenceNode))
        diff = np.nan_to_num(diff, nan=0.0)
        if outputNode is None:
            outputNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(mapNode.GetName() + " minus reference"))
        outputNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(_matrixArray(mapNode)))
        slicer.util.updateVolumeFromArray(outputNode, diff)
        if outputNode.GetDisplayNode() is None:
            outputNode.CreateDefaultDisplayNodes()
        display = outputNode.GetDisplayNode()
        limit = float(np.percentile(np.abs(diff[diff != 0]), 99)) if np.any(diff) else 1.0
        display.SetAndObserveColorNodeID(self.colorNodeID("diverging"))
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(-limit, limit)
        return outputNode

    # --- comparison with a reference: CSV, plots, layout (issue 6) -------------------------------
    def tableRows(self, tableNode):
        """The rows of a statistics table node as roistats rows (dicts keyed by roistats.COLUMNS)."""
        from OEFPredictorLib import roistats

        table = tableNode.GetTable()
        columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        rows = []
        for r in range(table.GetNumberOfRows()):
            row = {}
            for c, name in enumerate(columns):
                value = table.GetValue(r, c)
                if name in roistats.TEXT_COLUMNS:
                    row[name] = value.ToString()
                elif name in roistats.INT_COLUMNS:
                    row[name] = int(value.ToInt())
                else:
                    row[name] = float(value.ToDouble())
            rows.append(row)
        return rows

    def exportTableToCsv(self, tableNode, path):
        """Write a statistics table node to CSV, in the command line's format (roistats.write_csv:
        same columns, floats at full precision, NaN as an empty cell). Atomic: written beside the
        file and renamed, so an error leaves no partial file. Returns the path."""
        from OEFPredictorLib import roistats

        if tableNode is None or tableNode.GetTable() is None or tableNode.GetTable().GetNumberOfColumns() == 0:
            raise InputError(_("There is no statistics table to export; compute the statistics first."))
        path = Path(path)
        if path.is_dir():
            raise InputError(_("{path} is a folder; give a file name.").format(path=path))
        table = tableNode.GetTable()
        columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        return roistats.write_csv(self.tableRows(tableNode), path, columns=columns)

    @staticmethod
    def _ownedNode(owner, role, className, name):
        """The node `owner` references under `role` (reruns update it), else a new one."""
        node = owner.GetNodeReference(role) if owner is not None else None
        if node is None or not node.IsA(className) or node.GetScene() is not slicer.mrmlScene:
            node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
            if owner is not None:
                owner.SetNodeReferenceID(role, node.GetID())
        return node

    def comparisonPlots(self, mapNode, referenceNode, roiNode, maskNode=None, maxPoints=None, seed=0):
        """Scatter (prediction against reference) and Bland-Altman (difference against mean) plot
        chart nodes of the voxels inside the ROIs (their union) and the mask where both values are
        finite.

        For display, at most maxPoints voxels (default MAX_PLOT_POINTS) are drawn, a uniform random
        subsample with a fixed seed; the chart titles say how many of how many. The Bland-Altman
        lines (mean difference, limits of agreement mean -+ 1.96 SD) and the identity line use all
        the voxels. The nodes are referenced from mapNode (roles COMPARISON_ROLES): reruns update
        them, never duplicate them. Returns {"scatterChart", "blandAltmanChart", "table",
        "linesTable", "nPairs", "nShown", "meanDifference", "loaLower", "loaUpper"}."""
        from OEFPredictorLib import roistats

        maxPoints = MAX_PLOT_POINTS if maxPoints is None else int(maxPoints)
        if not np.allclose(_matrixArray(mapNode), _matrixArray(referenceNode), atol=1e-4):
            raise InputError(_("The reference volume is not on the map's voxel grid."))
        values = np.array(slicer.util.arrayFromVolume(mapNode), dtype=np.float64)
        reference = np.array(slicer.util.arrayFromVolume(referenceNode), dtype=np.float64)
        if values.shape != reference.shape:
            raise InputError(_("The reference volume is not on the map's voxel grid."))
        rois = self.roisFromNode(roiNode, mapNode)
        union = np.zeros(values.shape, bool)
        for roi in rois.values():
            union |= roi
        mask = None if maskNode is None else np.array(slicer.util.arrayFromVolume(maskNode)) > 0
        pred, ref = roistats.paired_values(values, reference, union, mask)
        nPairs = int(pred.size)
        if nPairs > maxPoints:
            keep = np.sort(np.random.default_rng(seed).choice(nPairs, size=maxPoints, replace=False))
            shownPred, shownRef = pred[keep], ref[keep]
        else:
            shownPred, shownRef = pred, ref
        nShown = int(shownPred.size)
        stats = roistats.paired_statistics(pred, ref)

        name = mapNode.GetAttribute("OEFPredictor.Map") or mapNode.GetName()
        unit = MAP_DISPLAY.get(name, {}).get("unit", mapNode.GetAttribute("OEFPredictor.Unit") or "")
        unitText = f" ({unit})" if unit else ""
        roles = COMPARISON_ROLES
        pointsTable = self._ownedNode(mapNode, roles["table"], "vtkMRMLTableNode", f"{name} comparison points")
        linesTable = self._ownedNode(mapNode, roles["linesTable"], "vtkMRMLTableNode", f"{name} comparison lines")
        mean = (shownPred + shownRef) / 2.0
        diff = shownPred - shownRef
        _fillTable(pointsTable, {"reference": shownRef, "prediction": shownPred, "mean": mean, "difference": diff})
        if nPairs:
            lo = float(min(pred.min(), ref.min()))
            hi = float(max(pred.max(), ref.max()))
            meanAll = (pred + ref) / 2.0
            mlo, mhi = float(meanAll.min()), float(meanAll.max())
        else:
            lo = hi = mlo = mhi = float("nan")
        md, lower, upper = stats["ba_mean_diff"], stats["ba_loa_lower"], stats["ba_loa_upper"]
        _fillTable(linesTable, {"identity": np.array([lo, hi]), "ba_x": np.array([mlo, mhi]),
                                "ba_mean_diff": np.array([md, md]), "ba_loa_lower": np.array([lower, lower]),
                                "ba_loa_upper": np.array([upper, upper])})

        def series(role, title, table, xColumn, yColumn, scatter, color, style=None):
            node = self._ownedNode(mapNode, roles[role], "vtkMRMLPlotSeriesNode", title)
            node.SetName(title)
            node.SetAndObserveTableNodeID(table.GetID())
            node.SetXColumnName(xColumn)
            node.SetYColumnName(yColumn)
            node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            if scatter:
                node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
                node.SetMarkerSize(4)
                node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
            else:
                node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
                node.SetLineStyle(style if style is not None else slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
                node.SetLineWidth(2)
            node.SetColor(*color)
            return node

        dash = slicer.vtkMRMLPlotSeriesNode.LineStyleDash
        sample = (_("{n:,} of {total:,} voxels shown (random subsample)").format(n=nShown, total=nPairs)
                  if nShown < nPairs else _("{n:,} voxels").format(n=nPairs))
        scatterSeries = [
            series("scatterPoints", _("Voxels"), pointsTable, "reference", "prediction", True, (0.2, 0.4, 0.8)),
            series("identity", _("Identity"), linesTable, "identity", "identity", False, (0.3, 0.3, 0.3), dash)]
        baSeries = [
            series("baPoints", _("Voxels (Bland-Altman)"), pointsTable, "mean", "difference", True, (0.2, 0.4, 0.8)),
            series("baMean", _("Mean difference"), linesTable, "ba_x", "ba_mean_diff", False, (0.8, 0.2, 0.2)),
            series("baLower", _("Lower limit of agreement"), linesTable, "ba_x", "ba_loa_lower", False,
                   (0.5, 0.5, 0.5), dash),
            series("baUpper", _("Upper limit of agreement"), linesTable, "ba_x", "ba_loa_upper", False,
                   (0.5, 0.5, 0.5), dash)]
        charts = {}
        for key, title, xTitle, yTitle, seriesNodes in (
                ("scatterChart", _("{name}: prediction against reference, {sample}").format(name=name, sample=sample),
                 _("Reference {name}").format(name=name) + unitText, _("Predicted {name}").format(name=name) + unitText,
                 scatterSeries),
                ("blandAltmanChart", _("{name}: Bland-Altman, bias {b:.3g}, limits {lo:.3g} to {hi:.3g}; {sample}").format(
                    name=name, b=md, lo=lower, hi=upper, sample=sample),
                 _("Mean of prediction and reference") + unitText, _("Prediction minus reference") + unitText,
                 baSeries)):
            chart = self._ownedNode(mapNode, roles[key], "vtkMRMLPlotChartNode", f"{name} {key}")
            with slicer.util.NodeModify(chart):
                chart.SetTitle(title)
                chart.SetXAxisTitle(xTitle)
                chart.SetYAxisTitle(yTitle)
                chart.SetLegendVisibility(True)
                chart.RemoveAllPlotSeriesNodeIDs()
                for node in seriesNodes:
                    chart.AddAndObservePlotSeriesNodeID(node.GetID())
            charts[key] = chart
        return {**charts, "table": pointsTable, "linesTable": linesTable, "nPairs": nPairs, "nShown": nShown,
                "meanDifference": md, "loaLower": lower, "loaUpper": upper}

    def layoutNode(self):
        """The scene's layout node (the application's; created outside it, e.g. in tests)."""
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "layoutManager") and app.layoutManager() is not None:
            return app.layoutManager().layoutLogic().GetLayoutNode()
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode("vtkMRMLLayoutNode", "vtkMRMLLayoutNode")
        if node is None:
            node = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if node is None:
            node = slicer.vtkMRMLLayoutNode()
            node.SetSingletonTag("vtkMRMLLayoutNode")
            scene.AddNode(node)
        return node

    def _viewNode(self, className, layoutName):
        scene = slicer.mrmlScene
        for i in range(scene.GetNumberOfNodesByClass(className)):
            node = scene.GetNthNodeByClass(i, className)
            if node.GetLayoutName() == layoutName:
                return node
        return None

    def comparisonSliceNodes(self):
        """{layout name: (slice node, slice composite node)} of the comparison layout's three views.

        In Slicer the layout manager creates them when the layout is shown; elsewhere (a script
        without views, the tests) they are created here as the application would."""
        nodes = {}
        for layoutName, _label, _color in COMPARISON_SLICE_VIEWS:
            sliceNode = self._viewNode("vtkMRMLSliceNode", layoutName)
            if sliceNode is None:
                sliceLogic = slicer.vtkMRMLSliceLogic()
                sliceLogic.SetMRMLScene(slicer.mrmlScene)
                sliceNode = sliceLogic.AddSliceNode(layoutName)
                self._comparisonSliceLogics.append(sliceLogic)
            composite = slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(sliceNode)
            if composite is None:
                composite = slicer.vtkMRMLSliceCompositeNode()
                composite.SetLayoutName(layoutName)
                slicer.mrmlScene.AddNode(composite)
            nodes[layoutName] = (sliceNode, composite)
        return nodes

    def showComparisonLayout(self, mapNode, referenceNode, differenceNode, scatterChart=None, blandAltmanChart=None,
                             tableNode=None):
        """Switch to the comparison layout: prediction, reference and difference side by side in
        three axial slice views linked together (own view group, so the usual views are not
        moved), and below them the scatter and Bland-Altman charts and the statistics table.
        The layout is registered with the layout node once (COMPARISON_LAYOUT_ID)."""
        layoutNode = self.layoutNode()
        if not layoutNode.IsLayoutDescription(COMPARISON_LAYOUT_ID):
            layoutNode.AddLayoutDescription(COMPARISON_LAYOUT_ID, COMPARISON_LAYOUT_XML)
        else:
            layoutNode.SetLayoutDescription(COMPARISON_LAYOUT_ID, COMPARISON_LAYOUT_XML)
        layoutNode.SetViewArrangement(COMPARISON_LAYOUT_ID)
        volumes = (mapNode, referenceNode, differenceNode)
        views = self.comparisonSliceNodes()
        for (layoutName, _label, _color), volume in zip(COMPARISON_SLICE_VIEWS, volumes):
            sliceNode, composite = views[layoutName]
            sliceNode.SetViewGroup(COMPARISON_VIEW_GROUP)
            if sliceNode.GetOrientation() != "Axial":
                sliceNode.SetOrientationToAxial()
            with slicer.util.NodeModify(composite):
                composite.SetBackgroundVolumeID(volume.GetID() if volume is not None else None)
                composite.SetForegroundVolumeID(None)
                composite.SetLabelVolumeID(None)
                composite.SetLinkedControl(True)
                composite.SetHotLinkedControl(False)
        for layoutName, className, node, setter in (
                (COMPARISON_PLOT_VIEWS[0], "vtkMRMLPlotViewNode", scatterChart, "SetPlotChartNodeID"),
                (COMPARISON_PLOT_VIEWS[1], "vtkMRMLPlotViewNode", blandAltmanChart, "SetPlotChartNodeID"),
                (COMPARISON_TABLE_VIEW, "vtkMRMLTableViewNode", tableNode, "SetTableNodeID")):
            if node is None:
                continue
            viewNode = self._viewNode(className, layoutName)
            if viewNode is None:
                viewNode = slicer.mrmlScene.AddNewNodeByClass(className)
                viewNode.SetLayoutName(layoutName)
                viewNode.SetName(layoutName)
            getattr(viewNode, setter)(node.GetID())
        app = getattr(slicer, "app", None)
        if app is not None and hasattr(app, "layoutManager") and app.layoutManager() is not None:
            for layoutName, _label, _color in COMPARISON_SLICE_VIEWS:  # centre each view on its volume
                sliceWidget = app.layoutManager().sliceWidget(layoutName)
                if sliceWidget is not None:
                    sliceWidget.sliceLogic().FitSliceToAll()
        return views

    def compareWithReference(self, mapNodes, roiNode, referenceNode, maskNode=None, tableNode=None,
                             mapName="OEF", showLayout=False, maxPoints=None):
        """All of the comparison in one call: the statistics table (see computeRoiStatistics), the
        difference map, and the scatter and Bland-Altman charts of mapNodes[mapName] against
        referenceNode inside the ROIs; optionally the comparison layout. Reruns update the same
        nodes (referenced from the map node). Returns a dict of the nodes and numbers."""
        mapNode = mapNodes[mapName]
        if tableNode is None:
            tableNode = mapNode.GetNodeReference(COMPARISON_ROLES["statistics"])
        tableNode = self.computeRoiStatistics(mapNodes, roiNode, referenceNodes={mapName: referenceNode},
                                              maskNode=maskNode, tableNode=tableNode)
        mapNode.SetNodeReferenceID(COMPARISON_ROLES["statistics"], tableNode.GetID())
        difference = self.differenceMap(mapNode, referenceNode,
                                        outputNode=mapNode.GetNodeReference(COMPARISON_ROLES["difference"]))
        mapNode.SetNodeReferenceID(COMPARISON_ROLES["difference"], difference.GetID())
        result = self.comparisonPlots(mapNode, referenceNode, roiNode, maskNode=maskNode, maxPoints=maxPoints)
        result.update({"statistics": tableNode, "difference": difference})
        if showLayout:
            self.showComparisonLayout(mapNode, referenceNode, difference, result["scatterChart"],
                                      result["blandAltmanChart"], tableNode)
        return result

    # --- models, backend, dependencies -------------------------------------------------------------
    def modelSummary(self, model, method="lstm"):
        """One line about the chosen model (from its card), without loading Keras."""
        import json

        if method not in METHODS_WITH_MODEL:
            return _("Voxelwise QQ fit: no network model needed (slower).")
        if not model:
            return _("Choose a .keras model file; its .json card must be beside it.")
        try:
            path = resourcePath("Models", model.split(":", 1)[1]) if model.startswith("bundled:") else Path(model)
            card = json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
            tes = card["protocol"]["echo_times_ms"]
            text = _("{name}: {n} echoes, TE {a:g}-{b:g} ms, {t:g} T").format(
                name=Path(path).name, n=len(tes), a=tes[0], b=tes[-1], t=card["protocol"]["field_strength_T"])
            return text
        except FileNotFoundError:
            return _("The bundled model is not installed; choose a model file.")
        except Exception as exc:
            return _("Cannot read the model card: {e}").format(e=exc)

    @staticmethod
    def tensorflowInstalled():
        return importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("keras") is not None

    def backendSummary(self, detect=False):
        """What the backend sees. detect=True imports TensorFlow (a few seconds) to list devices."""
        if not self.tensorflowInstalled():
            return _("TensorFlow is not installed yet: it is installed on the first Apply (about 600 MB).")
        if not detect:
            return _("TensorFlow is installed. Press Detect to list the devices it sees.")
        try:
            import keras
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            names = ", ".join(g.name.split(":", 1)[-1] for g in gpus) if gpus else _("none")
            return _("Keras {k} on TensorFlow {t}: CPU; GPUs: {g}.").format(k=keras.__version__, t=tf.__version__, g=names)
        except Exception as exc:
            return _("TensorFlow does not load: {e}").format(e=str(exc).splitlines()[0][:200])

    def ensureDependencies(self, ask=True):
        """Install TensorFlow/Keras (Resources/requirements.txt) on first use, after asking.

        Returns True when they are importable. Never runs at import."""
        if self.tensorflowInstalled():
            return True
        requirements = resourcePath("requirements.txt")
        if ask and not slicer.util.confirmOkCancelDisplay(
                _("OEF Predictor needs TensorFlow and Keras (about 600 MB download). Install them now?\n\n"
                  "Offline: install the wheels listed in {req} with\n"
                  "slicer.util.pip_install('-r {req}') from a local wheel folder.").format(req=requirements)):
            return False
        try:
            with slicer.util.WaitCursor():
                if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):  # Slicer >= 5.12
                    reqs = [line.strip() for line in Path(requirements).read_text().splitlines()
                            if line.strip() and not line.strip().startswith("#")]
                    slicer.packaging.pip_ensure(reqs, requester="OEFPredictor")
                else:
                    slicer.util.pip_install(f"-r {requirements}")
        except Exception as exc:
            logging.exception("Installing TensorFlow failed")
            slicer.util.errorDisplay(_(
                "Installing TensorFlow failed: {e}\n\nCheck the network or proxy, or install offline from "
                "wheels listed in {req}. The voxelwise QQ fits (Advanced > Method) work without "
                "TensorFlow.").format(e=exc, req=requirements))
            return False
        importlib.invalidate_caches()
        if not self.tensorflowInstalled():
            slicer.util.errorDisplay(_("TensorFlow was installed but cannot be found; restart Slicer."))
            return False
        return True


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

        if not OEFPredictorLogic.tensorflowInstalled():
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
                                                  model=str(modelPath), device="cpu")
        self.assertEqual(set(MAP_NAMES), set(outputs))
        self.assertEqual(outputs["OEF"].GetImageData().GetDimensions(), echoNodes[0].GetImageData().GetDimensions())
        self.delayDisplay("Test passed")
