"""Prediction on MRML nodes: the inputs copied out of MRML (main thread), the engine in a background
job (OEFPredictorLib.predict.PredictionJob), and the finished maps written into volume nodes.

Nothing in the scene changes until a run has succeeded and finish() writes the outputs; a failure
while writing restores the chosen output volumes and removes every node it added.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import vtk

import slicer
from OEFPredictorLib import maptable, methods, predict
from OEFPredictorLib.errors import CancelledError, InputError

from . import display
from .compat import _
from .comparison import matrixArray


@dataclasses.dataclass
class PredictionSettings:
    """Everything about a run except the input nodes: the Logic's input, and what the panel reads
    from its widgets, which are bound to the parameter node (OEFPredictor.PARAMETER_NODE_FIELDS:
    the same settings, saved with the scene; the model kept as useBundledModel + modelPath).

    echoTimesMs: one per echo, in ms (None: from the sequence's index or the DICOM attributes).
    fieldStrength: tesla (None: from the echoes' DICOM MagneticFieldStrength; never assumed).
    method: a name of OEFPredictorLib.methods.METHODS (the registry the command line uses too).
    model: None (the method's bundled model), a .keras path with its .json card, or a ModelBundle.
    outputNodes: {map name: existing scalar volume to overwrite}; the others are created.
    fieldMapUnits: the unit of a field map volume (OEFPredictorLib.fieldmap.UNITS); never assumed."""

    echoTimesMs: list[float] | None = None
    fieldStrength: float | None = None
    fieldMapUnits: str | None = None
    model: Any = None
    device: str = "auto"
    method: str | None = None  # None: the model's own method, else methods.DEFAULT_METHOD
    opacity: float = 0.6
    outputNodes: dict = dataclasses.field(default_factory=dict)

    def modelFile(self):
        """The model file this run uses: the given one, else the method's bundled one (the one place
        that resolves it; FileNotFoundError when it is not installed); None for methods without a model."""
        from OEFPredictorLib import resources

        if not methods.get(self.method).uses_model:
            return None
        if self.model is None:
            return resources.bundled_model_path(self.method)
        return getattr(self.model, "path", self.model)  # a ModelBundle, or a path

    def modelFiles(self):
        """Every model file this run may use: the given one, else all the method's bundled ones (the engine
        runs the first that reads the data's echo train); empty for methods without a model."""
        from OEFPredictorLib import resources

        if self.model is None and methods.get(self.method).uses_model:
            return resources.bundled_model_paths(self.method)
        model = self.modelFile()
        return [] if model is None else [model]


def echoCount(echoes):
    if echoes is None:
        return 0
    if isinstance(echoes, (list, tuple)):
        return len(echoes)
    return echoes.GetNumberOfDataNodes()


class PredictionRun:
    """A prediction running in the background (returned by PredictionLogic.startPrediction).

    progress() -> (fraction, message), done, cancel(), wait() and finish() -> {map name: node};
    poll_events() as the job's (for the panel's JobController). Nothing in the scene changes until
    finish() is called after success (main thread only).
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

    def poll_events(self):
        return self.job.poll_events()

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
        result = self.job.wait()  # the run's error, if any; from here on a cancel changes nothing
        self.outputs = self.logic.writeOutputs(result, self.context)
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


class PredictionLogic:
    """MRML nodes in, MRML nodes out. jobFactory(inputs, model=, device=, method=) makes the
    background job (predict.PredictionJob; tests may pass a fake). One run at a time."""

    def __init__(self, jobFactory=None):
        self.jobFactory = jobFactory or predict.PredictionJob
        self.activeRun = None
        # output node ID -> the voxels its map was predicted in: the maps are 0 elsewhere, and 0 is a
        # valid value, so the ROI statistics (ComparisonLogic) leave those voxels out
        self.predictionMasks = {}

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

    def fieldStrengthFromNodes(self, echoes):
        """The field strength (T) of the echoes' DICOM attributes (MagneticFieldStrength, tag
        0018,0087); None when no echo carries it."""
        if echoes is None:
            return None
        if isinstance(echoes, (list, tuple)):
            nodes = list(echoes)
        else:
            nodes = [echoes] + [echoes.GetNthDataNode(i) for i in range(echoes.GetNumberOfDataNodes())]
        for node in nodes:
            value = self._dicomValue(node, ("DICOM.MagneticFieldStrength", "MagneticFieldStrength"), "0018,0087")
            if value is not None and value > 0:
                return value
        return None

    @staticmethod
    def _dicomValue(node, attributes, tag):
        """A number from a node's attributes, else from its DICOM file's tag; None when absent."""
        if node is None:
            return None
        for attribute in attributes:
            value = node.GetAttribute(attribute)
            if value:
                try:
                    return float(value)
                except ValueError:
                    pass
        uids = node.GetAttribute("DICOM.instanceUIDs") if node.IsA("vtkMRMLScalarVolumeNode") else None
        db = getattr(slicer, "dicomDatabase", None)
        if uids and db is not None:
            try:
                value = db.fileValue(db.fileForInstance(uids.split()[0]), tag)
                return float(value) if value else None
            except Exception:
                return None
        return None

    @staticmethod
    def _volumeEchoTimeMs(node):
        return PredictionLogic._dicomValue(node, ("DICOM.EchoTime", "EchoTime"), "0018,0081")

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

    def collectInputs(self, echoes, qsm, mask=None, cbf=None, echoTimesMs=None, fieldStrength=None, fieldMap=None,
                      fieldMapUnits=None):
        """Copy the arrays out of MRML (main thread): (PredictionInputs, context for the outputs).

        Refuses, with what to do, inputs that do not share the echoes' voxel grid, and a field map
        without its unit."""
        from OEFPredictorLib import fieldmap, physics
        from OEFPredictorLib.predict import PredictionInputs

        nodes = self.echoVolumeNodes(echoes)
        if qsm is None:
            raise InputError(_("No QSM volume given."))
        reference = nodes[0]
        refMatrix = matrixArray(reference)
        refDims = reference.GetImageData().GetDimensions()
        refTransform = self._parentTransformID(reference, echoes)
        named = [(_("echo {i}").format(i=i + 1), n) for i, n in enumerate(nodes)] + [(_("QSM"), qsm)]
        if mask is not None:
            named.append((_("mask"), mask))
        if cbf is not None:
            named.append((_("CBF"), cbf))
        if fieldMap is not None:
            named.append((_("field map"), fieldMap))
            unit = fieldmap.unit_named(fieldMapUnits) if fieldMapUnits else None
            if unit is None:
                raise InputError(_("The unit of the field map '{name}' is not set: choose {units} "
                                   "(Field map unit).").format(name=fieldMap.GetName(), units=fieldmap.UNITS_LISTED))
        for label, node in named:
            if node.GetImageData() is None:
                raise InputError(_("The {label} volume '{name}' has no voxels.").format(label=label, name=node.GetName()))
            dims = node.GetImageData().GetDimensions()
            if node.GetImageData().GetNumberOfScalarComponents() != 1:
                raise InputError(_("The {label} volume '{name}' has several components per voxel; give a "
                                   "scalar volume.").format(label=label, name=node.GetName()))
            if tuple(dims) != tuple(refDims) or not np.allclose(matrixArray(node), refMatrix, atol=1e-4, rtol=1e-5):
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
        if fieldStrength is None:  # never assumed: it changes every map
            fieldStrength = self.fieldStrengthFromNodes(echoes)
            if fieldStrength is None:
                raise InputError(_("The field strength is unknown: the echoes carry no DICOM MagneticFieldStrength. "
                                   "Set Field strength (T) in the panel (fieldStrength)."))
        try:
            protocol = physics.Protocol.from_milliseconds(list(echoTimesMs), float(fieldStrength))
        except ValueError as exc:
            raise InputError(str(exc)) from None

        echoArray = np.stack([np.asarray(slicer.util.arrayFromVolume(n), dtype=np.float32) for n in nodes], axis=-1)
        qsmArray = np.array(slicer.util.arrayFromVolume(qsm), dtype=np.float32)
        maskArray = None if mask is None else np.array(slicer.util.arrayFromVolume(mask)) > 0
        cbfArray = None if cbf is None else np.array(slicer.util.arrayFromVolume(cbf), dtype=np.float32)
        fieldMapHz = None if fieldMap is None else fieldmap.to_hz(slicer.util.arrayFromVolume(fieldMap), unit,
                                                                    protocol.field_strength)
        # the voxel size (x, y, z) in mm: the spatial model resamples to its own grid
        spacing = tuple(float(x) for x in nodes[0].GetSpacing())
        inputs = PredictionInputs(echoes=echoArray, qsm=qsmArray, protocol=protocol, mask=maskArray, cbf=cbfArray,
                                  spacing=spacing, field_map=fieldMapHz)
        context = {
            "ijkToRAS": refMatrix,
            "transformID": refTransform,
            "background": self._echoOneDisplayNode(echoes, nodes),
            "baseName": (echoes.GetName() if not isinstance(echoes, (list, tuple)) else nodes[0].GetName()) or "OEF",
            "fieldStrength": protocol.field_strength,  # recorded on the outputs: the field actually used
        }
        return inputs, context

    @staticmethod
    def _parentTransformID(node, sequence=None):
        # sequence data nodes live in the sequence's own scene: the proxy node's transform counts
        if node.GetScene() is not slicer.mrmlScene:
            shown = PredictionLogic._echoOneDisplayNode(sequence, [node]) if sequence is not None else None
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

    # --- running ---------------------------------------------------------------------------------
    def startPrediction(self, echoes, qsm, mask=None, cbf=None, settings=None, fieldMap=None, **overrides):
        """Copy the inputs out of MRML and start the engine in a background job.

        echoes: a vtkMRMLSequenceNode (index values = echo times) or a list of scalar volume nodes
        in echo order. fieldMap: a scalar volume of the field (settings.fieldMapUnits) whose
        gradients the echoes are corrected for. settings: a PredictionSettings; keyword arguments
        override its fields (echoTimesMs=, model=, device=, fieldMapUnits=, ...). Returns a
        PredictionRun. One run at a time: a second
        start while one runs is refused."""
        settings = dataclasses.replace(settings or PredictionSettings(), **overrides)
        if self.activeRun is not None and not self.activeRun.done:
            raise InputError(_("A prediction is already running; wait for it to finish or cancel it first."))
        if settings.method is not None:  # None: the engine lets the model file's card decide
            settings.method = methods.get(settings.method).name  # InputError naming the choices
        if settings.device not in predict.DEVICES:
            raise InputError(_("Unknown device {d!r}; choose one of {ds}.").format(
                d=settings.device, ds=", ".join(predict.DEVICES)))
        inputs, context = self.collectInputs(echoes, qsm, mask, cbf, settings.echoTimesMs, settings.fieldStrength,
                                             fieldMap, settings.fieldMapUnits)
        outputNodes = {name: node for name, node in (settings.outputNodes or {}).items() if node is not None}
        for name, node in outputNodes.items():
            if not node.IsA("vtkMRMLScalarVolumeNode"):
                raise InputError(_("The output for {name} must be a scalar volume node.").format(name=name))
            if node in self.echoVolumeNodes(echoes) or node in (qsm, mask, cbf, fieldMap):
                raise InputError(_("The output for {name} is one of the inputs; choose another volume or create "
                                   "a new one.").format(name=name))
        if len({node.GetID() for node in outputNodes.values()}) < len(outputNodes):
            raise InputError(_("The same volume is chosen as the output of two maps; choose one volume per map "
                               "(or create new ones)."))
        context["outputNodes"] = outputNodes
        context["opacity"] = float(settings.opacity)
        job = self.jobFactory(inputs, model=settings.model, device=settings.device, method=settings.method)
        job.start()
        self.activeRun = PredictionRun(self, job, context)
        return self.activeRun

    def process(self, echoes, qsm, mask=None, cbf=None, settings=None, wait=True, timeout=None, fieldMap=None,
                **overrides):
        """Predict OEF and the other maps from MRML nodes (see startPrediction for the arguments).

        wait=True (default): blocks until done and returns {map name: output volume node}
        (maptable.BASE, CMRO2 with a CBF volume, the interval maps of methods that give one);
        raises CancelledError or InputError without touching the scene. wait=False: returns the
        PredictionRun."""
        run = self.startPrediction(echoes, qsm, mask=mask, cbf=cbf, settings=settings, fieldMap=fieldMap, **overrides)
        return run.wait(timeout) if wait else run

    # --- outputs ----------------------------------------------------------------------------------
    def writeOutputs(self, result, context):
        """Write a finished PredictionResult into volume nodes (main thread).

        Nodes are created only here, after success; if writing fails, every node added here is
        removed again and existing nodes get their voxels, geometry and transform back."""
        scene = slicer.mrmlScene
        missing = [n for n in maptable.BASE if n not in result.maps]
        if missing:
            raise RuntimeError(f"The engine returned no {', '.join(missing)} map.")
        names = [n for n in maptable.MAPS if n in result.maps] + [n for n in result.maps if n not in maptable.MAPS]
        outputNodes = context["outputNodes"]
        for name, node in outputNodes.items():
            if name in result.maps and scene.GetNodeByID(node.GetID()) is not node:
                raise InputError(_("The volume chosen as the {name} output ('{node}') was deleted during the run; "
                                   "nothing was written. Choose another output volume (or none) and run "
                                   "again.").format(name=name, node=node.GetName()))
        resultMask = getattr(result, "mask", None)
        resultMask = None if resultMask is None else np.asarray(resultMask, dtype=bool)
        idsBefore = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        written = {}
        saved = []  # (node, image data copy, IJK-to-RAS, transform ID) of the existing nodes we overwrite
        try:
            for name in names:
                array = np.asarray(result.maps[name], dtype=np.float32)
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
                unit = maptable.unit(name)
                node.SetAttribute("OEFPredictor.Map", name)
                node.SetAttribute("OEFPredictor.Unit", unit)
                node.SetAttribute("OEFPredictor.FieldStrength", f"{context['fieldStrength']:g}")
                node.SetVoxelValueUnits(display.unitsCode(unit)) if hasattr(node, "SetVoxelValueUnits") else None
                display.setMapDisplay(node, name, array, resultMask)
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
        for node in outputs.values():
            self.predictionMasks[node.GetID()] = resultMask
        display.showOverlay(outputs["OEF"], context.get("background"), context.get("opacity", 0.6))
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
