"""Shared helpers for the Slicer-module tests (not a test file).

- slicer_scene(): a real MRML scene from the slicer-core wheel, set up in the order
  the MRML logics need (application, colour, segmentation, volumes, sequences logics; Red/Yellow/Green slice views),
  and published as slicer.mrmlScene / slicer.modules as the Slicer application does.
- demo_case(): the demo virtual patient (seed and index of `oefpredictor demo`) at 4 mm, and a tiny
  untrained Keras LSTM with a valid model card for the patient's protocol, made once per process.
"""
from __future__ import annotations

import functools
import tempfile
import types
from pathlib import Path

import numpy as np


def slicer_scene():
    import slicer

    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    colorLogic = slicer.vtkSlicerColorLogic()
    colorLogic.SetMRMLApplicationLogic(appLogic)
    colorLogic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Colors", colorLogic)
    segLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segLogic.SetMRMLScene(scene)
    volLogic = slicer.vtkSlicerVolumesLogic()
    volLogic.SetMRMLApplicationLogic(appLogic)
    volLogic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Volumes", volLogic)
    seqLogic = slicer.vtkSlicerSequencesLogic()
    seqLogic.SetMRMLApplicationLogic(appLogic)
    seqLogic.SetMRMLScene(scene)
    appLogic.SetModuleLogic("Sequences", seqLogic)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        colors=types.SimpleNamespace(logic=lambda: colorLogic),
        volumes=types.SimpleNamespace(logic=lambda: volLogic),
        sequences=types.SimpleNamespace(logic=lambda: seqLogic),
        segmentations=types.SimpleNamespace(logic=lambda: segLogic),
    )
    sliceLogics = []
    for name in ("Red", "Yellow", "Green"):
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLApplicationLogic(appLogic)
        sliceLogic.SetMRMLScene(scene)
        sliceLogic.AddSliceNode(name)
        sliceLogics.append(sliceLogic)
    # the logics hold raw pointers to each other: keep them alive while this scene is current
    global _CURRENT
    _CURRENT = types.SimpleNamespace(scene=scene, appLogic=appLogic, colorLogic=colorLogic, volLogic=volLogic,
                                 seqLogic=seqLogic, segLogic=segLogic, sliceLogics=sliceLogics)
    return _CURRENT


_CURRENT = None


@functools.lru_cache(maxsize=1)
def demo_case():
    """(PatientData of the 4 mm demo patient, path of a tiny .keras model with its card)."""
    from OEFPredictorLib import models, physics, simulate
    from OEFPredictorLib.cli import demo

    folder = Path(tempfile.mkdtemp(prefix="oef_slicer_test_"))
    patient_dir = simulate.simulate_dataset(folder, n_patients=1, seed=demo.DEMO_SEED, voxel_size=4.0,
                                            independent_fraction=0.0, lesions=True, first_index=3)[0]
    patient = simulate.load_patient(patient_dir, with_truth=False)
    spec = {"architecture": "lstm", "cell": "lstm", "units": [8, 8, 8, 8], "dense": [8, 8, 8]}
    scaling = {"parameters": list(physics.PARAMETER_NAMES), "mean": [1.0, 15.0, 0.6, 0.03, 0.0],
               "std": [0.1, 5.0, 0.1, 0.01, 0.05]}
    card = models.make_card(spec, patient.protocol, scaling, 5, "centre")
    model_path = models.save_bundle(models.build_model(spec), card, folder / "tiny_lstm.keras")
    return patient, model_path


def ijk_to_ras(geometry) -> np.ndarray:
    """SimpleITK LPS geometry -> Slicer's IJK-to-RAS (flip the first two axes)."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.ijk_to_lps()


def add_echo_volumes(patient, ijkToRAS=None, dicom_field=True):
    """The echoes as volumes; `dicom_field`: with the DICOM MagneticFieldStrength attribute, as
    Slicer's DICOM import gives them (without it the field strength must be given)."""
    import slicer

    m = ijk_to_ras(patient.geometry) if ijkToRAS is None else ijkToRAS
    nodes = [slicer.util.addVolumeFromArray(np.ascontiguousarray(patient.echoes[..., e]), m, f"echo {e + 1}")
             for e in range(patient.echoes.shape[-1])]
    if dicom_field:
        for node in nodes:
            node.SetAttribute("DICOM.MagneticFieldStrength", f"{patient.protocol.field_strength:g}")
    return nodes


def add_echo_sequence(patient, with_browser=True, ijkToRAS=None):
    """The echoes as Slicer loads a multi-echo series: a sequence indexed by TE (ms) and a browser
    whose proxy node shows the selected echo."""
    import slicer

    scene = slicer.mrmlScene
    m = slicer.util.vtkMatrixFromArray(ijk_to_ras(patient.geometry) if ijkToRAS is None else ijkToRAS)
    seq = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "MEGRE")
    seq.SetIndexName("echo time")
    seq.SetIndexUnit("ms")
    seq.SetIndexType(seq.NumericIndex)
    for e, te in enumerate(patient.protocol.echo_times_ms):
        v = slicer.vtkMRMLScalarVolumeNode()
        v.SetIJKToRASMatrix(m)
        slicer.util.updateVolumeFromArray(v, np.ascontiguousarray(patient.echoes[..., e]))
        v.SetAttribute("DICOM.MagneticFieldStrength", f"{patient.protocol.field_strength:g}")  # as DICOM import
        seq.SetDataNodeAtValue(v, f"{te:g}")
    browser = None
    if with_browser:
        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "MEGRE browser")
        browser.SetAndObserveMasterSequenceNodeID(seq.GetID())
        slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
    return seq, browser


def scene_node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def fake_prediction_job(extra_maps=(), release=None, seen=None):
    """A job factory for OEFPredictorLogic(jobFactory=...): the real job class
    (OEFPredictorLib.jobs.BackgroundJob, a real thread) whose work stands in for the engine. It
    waits for `release` (a threading.Event) if given, honours cancel, and returns a
    PredictionResult with every map of maptable.BASE plus `extra_maps` (e.g. the interval maps
    "OEF_p05", "OEF_p95", "OEF_width" of a method that gives one): map i is i + 1 inside the mask.
    seen: a list that receives (inputs, method) of each job made."""
    from OEFPredictorLib import maptable, predict
    from OEFPredictorLib.errors import CancelledError
    from OEFPredictorLib.jobs import BackgroundJob

    def factory(inputs, model=None, device="auto", method="lstm"):
        if seen is not None:
            seen.append((inputs, method))
        def work(progress, cancel_event):
            progress(0.1, "Predicting (stand-in)")
            while release is not None and not release.wait(0.01):
                if cancel_event.is_set():
                    raise CancelledError("Prediction cancelled; nothing was produced.")
            mask = np.asarray(inputs.qsm) != 0 if inputs.mask is None else np.asarray(inputs.mask, bool)
            names = list(maptable.BASE) + list(extra_maps)
            arrays = {name: np.where(mask, float(i + 1), 0.0).astype(np.float32) for i, name in enumerate(names)}
            progress(1.0, "Done (stand-in)")
            return predict.PredictionResult(arrays, mask, [], 0.01, "cpu", None, method, False, int(mask.sum()))

        return BackgroundJob(work)

    return factory
