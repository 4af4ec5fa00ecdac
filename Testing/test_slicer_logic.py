"""OEFPredictorLogic against the real MRML library of the slicer-core wheel (no Slicer application).

The scene, the colour / volumes / sequences logics and the slice views are the real MRML classes
(set up as Testing/slicer_testing.py describes); the engine is the real OEFPredictorLib.predict with a tiny
untrained LSTM (the numbers need not be good, only identical to the engine run on the same arrays).
The input is the demo virtual patient (seed and index of `oefpredictor demo`) at 4 mm.
"""
from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("keras")

from slicer_testing import (  # noqa: E402
    add_echo_sequence,
    add_echo_volumes,
    demo_case,
    ijk_to_ras,
    scene_node_ids,
    slicer_scene,
)

import OEFPredictor as module  # noqa: E402
from OEFPredictorLib import maptable, predict  # noqa: E402
from OEFPredictorLib.errors import CancelledError, InputError  # noqa: E402

MAPS = maptable.BASE  # OEF, S0, R2, Y, v, chi_nb and the quality map


@pytest.fixture(scope="module")
def case():
    return demo_case()


@pytest.fixture()
def env():
    return slicer_scene()


def _matrix(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def _engine(patient, model_path, mask=None):
    inputs = predict.PredictionInputs(patient.echoes.astype(np.float32), patient.qsm.astype(np.float32),
                                      patient.protocol, mask=mask)
    return predict.predict_maps(inputs, model=str(model_path), method="lstm", device="cpu")


def _snapshot(nodes):
    return {n.GetID(): (np.array(slicer.util.arrayFromVolume(n)), _matrix(n).copy(), n.GetName()) for n in nodes}


def _assert_unchanged(before, nodes):
    for n in nodes:
        array, matrix, name = before[n.GetID()]
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(n), array)
        np.testing.assert_array_equal(_matrix(n), matrix)
        assert n.GetName() == name


def _check_outputs(outputs, reference_matrix, expected, opacity, background_id, env):
    scene = env.scene
    assert set(outputs) == set(MAPS)
    assert len({n.GetID() for n in outputs.values()}) == len(MAPS)
    for name in MAPS:
        node = outputs[name]
        assert node.IsA("vtkMRMLScalarVolumeNode") and scene.GetNodeByID(node.GetID()) is node
        np.testing.assert_allclose(_matrix(node), reference_matrix, atol=1e-9)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), expected.maps[name])
        display = node.GetDisplayNode()
        assert display is not None and not display.GetAutoWindowLevel()
        assert display.GetColorNodeID() and scene.GetNodeByID(display.GetColorNodeID()) is not None
    oef = outputs["OEF"].GetDisplayNode()
    assert (oef.GetWindowLevelMin(), oef.GetWindowLevelMax()) == pytest.approx((0.0, 80.0))
    assert "viridis" in scene.GetNodeByID(oef.GetColorNodeID()).GetName().lower()
    assert oef.GetApplyThreshold() and 0.0 < oef.GetLowerThreshold() < 0.01  # background (0 %) hidden
    chi = outputs["chi_nb"].GetDisplayNode()
    assert "diverging" in scene.GetNodeByID(chi.GetColorNodeID()).GetName().lower()
    assert chi.GetWindowLevelMin() == pytest.approx(-chi.GetWindowLevelMax())
    r2 = outputs["R2"].GetDisplayNode()
    assert "inferno" in scene.GetNodeByID(r2.GetColorNodeID()).GetName().lower()
    assert r2.GetApplyThreshold() and r2.GetLowerThreshold() < expected.maps["R2"][expected.mask].min()
    # overlay: OEF in the foreground of every slice view, over echo 1, with the chosen opacity
    n_views = scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")
    assert n_views == 3
    for i in range(n_views):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert composite.GetForegroundVolumeID() == outputs["OEF"].GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(opacity)
        assert composite.GetBackgroundVolumeID() == background_id
    # colour legend with units
    legend = slicer.vtkMRMLColorLegendDisplayNode.SafeDownCast(
        env.colorLogic.GetColorLegendDisplayNode(outputs["OEF"]))
    assert legend is not None and scene.GetNodeByID(legend.GetID()) is legend
    assert legend.GetTitleText() == "OEF (%)"


def test_echo_list_run_and_wait(case, env):
    patient, model_path = case
    echoes = add_echo_volumes(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    mask = slicer.util.addVolumeFromArray(patient.mask.astype(np.uint8), ijk_to_ras(patient.geometry), "mask",
                                          nodeClassName="vtkMRMLLabelMapVolumeNode")
    before = _snapshot(echoes + [qsm, mask])
    outputs = module.OEFPredictorLogic().process(
        echoes, qsm, mask=mask, echoTimesMs=patient.protocol.echo_times_ms, model=str(model_path), method="lstm", device="cpu",
        opacity=0.35)
    expected = _engine(patient, model_path, mask=patient.mask)
    _check_outputs(outputs, _matrix(echoes[0]), expected, 0.35, echoes[0].GetID(), env)
    _assert_unchanged(before, echoes + [qsm, mask])


def test_sequence_run_and_wait_and_rerun_overwrites(case, env):
    patient, model_path = case
    seq, browser = add_echo_sequence(patient)
    browser.SetSelectedItemNumber(5)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    logic = module.OEFPredictorLogic()
    assert logic.echoTimesFromNodes(seq) == pytest.approx(patient.protocol.echo_times_ms)
    # no echo times given: they come from the sequence's index values
    outputs = logic.process(seq, qsm, model=str(model_path), method="lstm", device="cpu", opacity=0.6)
    expected = _engine(patient, model_path)
    proxy = browser.GetProxyNode(seq)
    _check_outputs(outputs, _matrix(seq.GetNthDataNode(0)), expected, 0.6, proxy.GetID(), env)
    assert browser.GetSelectedItemNumber() == 0  # echo 1 under the overlay
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(proxy), patient.echoes[..., 0])

    # a rerun into the same output nodes overwrites them and creates no node
    ids = scene_node_ids(env.scene)
    again = logic.process(seq, qsm, model=str(model_path), method="lstm", device="cpu", outputNodes=outputs, opacity=0.8)
    assert {k: v.GetID() for k, v in again.items()} == {k: v.GetID() for k, v in outputs.items()}
    assert scene_node_ids(env.scene) == ids
    scene = env.scene
    assert scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode").GetForegroundOpacity() == pytest.approx(0.8)


def test_background_run_progress_then_finish(case, env):
    patient, model_path = case
    echoes = add_echo_volumes(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    ids = scene_node_ids(env.scene)
    run = module.OEFPredictorLogic().startPrediction(
        echoes, qsm, echoTimesMs=patient.protocol.echo_times_ms, model=str(model_path), method="lstm", device="cpu")
    fractions = []
    run.job.wait()
    assert scene_node_ids(env.scene) == ids  # nothing written before finish() on the main thread
    fractions.append(run.progress()[0])
    assert run.done and fractions[-1] == pytest.approx(1.0)
    outputs = run.finish()
    assert set(outputs) == set(MAPS)
    assert run.finish() is outputs  # idempotent


def test_cancel_leaves_scene_and_existing_outputs_untouched(case, env):
    patient, model_path = case
    seq, _browser = add_echo_sequence(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    existing = slicer.util.addVolumeFromArray(np.full(patient.qsm.shape, 7.0, np.float32),
                                              ijk_to_ras(patient.geometry), "old OEF")
    before = _snapshot([qsm, existing])
    ids = scene_node_ids(env.scene)
    composites = [(c.GetForegroundVolumeID(), c.GetForegroundOpacity())
                  for c in (env.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3))]
    run = module.OEFPredictorLogic().startPrediction(seq, qsm, model=str(model_path), method="lstm", device="cpu",
                                                     outputNodes={"OEF": existing})
    run.cancel()
    with pytest.raises(CancelledError):
        run.wait()
    assert run.job.cancelled
    assert scene_node_ids(env.scene) == ids
    _assert_unchanged(before, [qsm, existing])
    assert [(c.GetForegroundVolumeID(), c.GetForegroundOpacity())
            for c in (env.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(3))] == composites


def test_engine_error_leaves_scene_untouched(case, env):
    """Echo times that differ from the model's protocol: the engine refuses in the worker thread."""
    patient, model_path = case
    echoes = add_echo_volumes(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    before = _snapshot(echoes + [qsm])
    ids = scene_node_ids(env.scene)
    wrong = [t + 1.0 for t in patient.protocol.echo_times_ms]
    with pytest.raises(InputError, match="protocol"):
        module.OEFPredictorLogic().process(echoes, qsm, echoTimesMs=wrong, model=str(model_path), method="lstm", device="cpu")
    assert scene_node_ids(env.scene) == ids
    _assert_unchanged(before, echoes + [qsm])


def test_geometry_mismatch_refused_before_running(case, env):
    patient, model_path = case
    echoes = add_echo_volumes(patient)
    shifted = ijk_to_ras(patient.geometry).copy()
    shifted[0, 3] += 2.0  # QSM 2 mm off
    qsm = slicer.util.addVolumeFromArray(patient.qsm, shifted, "QSM shifted")
    ids = scene_node_ids(env.scene)
    logic = module.OEFPredictorLogic()
    with pytest.raises(InputError, match="same voxel grid"):
        logic.process(echoes, qsm, echoTimesMs=patient.protocol.echo_times_ms, model=str(model_path), method="lstm")
    cropped = slicer.util.addVolumeFromArray(np.ascontiguousarray(patient.qsm[1:]), ijk_to_ras(patient.geometry),
                                             "QSM cropped")
    with pytest.raises(InputError, match="same voxel grid"):
        logic.process(echoes, cropped, echoTimesMs=patient.protocol.echo_times_ms, model=str(model_path), method="lstm")
    with pytest.raises(InputError, match="echo times"):
        logic.process(echoes, qsm=slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "q"),
                      echoTimesMs=[5.0, 10.0], model=str(model_path), method="lstm")
    assert scene_node_ids(env.scene)[: len(ids)] == ids


def test_module_imports_without_tensorflow_and_main_window():
    """WITH_GENERIC_TESTS loads the module with --no-main-window: importing must not pull in Keras."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, 'OEFPredictor'); import OEFPredictor; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, sorted(sys.modules); "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_failure_while_writing_restores_existing_outputs(case, env, monkeypatch):
    """If writing the maps fails half-way (here: the display of the third map), the user's chosen
    output volumes get their voxels and geometry back and no new node stays in the scene."""
    patient, model_path = case
    echoes = add_echo_volumes(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    shifted = ijk_to_ras(patient.geometry).copy()
    shifted[:3, 3] += 5.0
    old_oef = slicer.util.addVolumeFromArray(np.full((3, 4, 5), 7.0, np.float32), shifted, "old OEF")
    old_s0 = slicer.util.addVolumeFromArray(np.full((3, 4, 5), 9.0, np.float32), shifted, "old S0")
    before = _snapshot([old_oef, old_s0, qsm] + echoes)
    ids = scene_node_ids(env.scene)
    logic = module.OEFPredictorLogic()
    real = module.display.setMapDisplay
    calls = []

    def failing(node, name, array, mask):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("display failed")
        return real(node, name, array, mask)

    monkeypatch.setattr(module.display, "setMapDisplay", failing)
    with pytest.raises(RuntimeError, match="display failed"):
        logic.process(echoes, qsm, echoTimesMs=patient.protocol.echo_times_ms, model=str(model_path), method="lstm",
                      device="cpu", outputNodes={"OEF": old_oef, "S0": old_s0})
    assert calls[:2] == ["OEF", "S0"]  # both existing nodes had been overwritten before the failure
    assert scene_node_ids(env.scene) == ids
    _assert_unchanged(before, [old_oef, old_s0, qsm] + echoes)


def test_one_volume_for_two_maps_is_refused(case, env):
    patient, model_path = case
    echoes = add_echo_volumes(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    target = slicer.util.addVolumeFromArray(np.zeros((3, 4, 5), np.float32), ijk_to_ras(patient.geometry), "out")
    ids = scene_node_ids(env.scene)
    with pytest.raises(InputError, match="same volume"):
        module.OEFPredictorLogic().process(echoes, qsm, echoTimesMs=patient.protocol.echo_times_ms,
                                           model=str(model_path), method="lstm", device="cpu",
                                           outputNodes={"OEF": target, "Y": target})
    assert scene_node_ids(env.scene) == ids


def test_sequence_under_a_transform_keeps_it_on_the_outputs(case, env):
    """The echo sequence is shown through its proxy node; a registration transform on the proxy
    (and the same one on the QSM) must carry over to the maps, not be refused or dropped."""
    patient, model_path = case
    seq, browser = add_echo_sequence(patient)
    transform = env.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    browser.GetProxyNode(seq).SetAndObserveTransformNodeID(transform.GetID())
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    qsm.SetAndObserveTransformNodeID(transform.GetID())
    outputs = module.OEFPredictorLogic().process(seq, qsm, model=str(model_path), method="lstm", device="cpu")
    assert {node.GetTransformNodeID() for node in outputs.values()} == {transform.GetID()}


# --- Concurrency and state (the job factory is the stand-in of slicer_testing.fake_prediction_job) --
def _small_inputs(case):
    patient, _model_path = case
    echoes = add_echo_volumes(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    return echoes, qsm, patient.protocol.echo_times_ms


def test_a_second_run_while_one_runs_is_refused(case, env):
    import threading

    from slicer_testing import fake_prediction_job

    echoes, qsm, tes = _small_inputs(case)
    release = threading.Event()
    logic = module.OEFPredictorLogic(jobFactory=fake_prediction_job(release=release))
    first = logic.startPrediction(echoes, qsm, echoTimesMs=tes)
    with pytest.raises(InputError, match="already running"):
        logic.startPrediction(echoes, qsm, echoTimesMs=tes)
    release.set()
    outputs = first.wait(timeout=30)
    second = logic.process(echoes, qsm, echoTimesMs=tes, outputNodes=outputs)  # once done: allowed
    assert second == outputs


def test_cancel_after_a_finished_wait_keeps_the_run_finished(case, env):
    from slicer_testing import fake_prediction_job

    echoes, qsm, tes = _small_inputs(case)
    run = module.OEFPredictorLogic(jobFactory=fake_prediction_job()).startPrediction(echoes, qsm, echoTimesMs=tes)
    outputs = run.wait(timeout=30)
    run.cancel()
    assert not run.job.cancelled and run.job.error is None
    assert run.finish() is outputs and all(env.scene.GetNodeByID(n.GetID()) is n for n in outputs.values())


def test_an_output_volume_deleted_during_the_run_gives_a_clear_message(case, env):
    import threading

    from slicer_testing import fake_prediction_job

    echoes, qsm, tes = _small_inputs(case)
    mine = slicer.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), name="my OEF")
    other = slicer.util.addVolumeFromArray(np.full((2, 2, 2), 5.0, np.float32), name="my S0")
    release = threading.Event()
    logic = module.OEFPredictorLogic(jobFactory=fake_prediction_job(release=release))
    run = logic.startPrediction(echoes, qsm, echoTimesMs=tes, outputNodes={"OEF": mine, "S0": other})
    env.scene.RemoveNode(mine)
    ids = scene_node_ids(env.scene)
    release.set()
    with pytest.raises(InputError, match="'my OEF'.*deleted during the run.*nothing was written"):
        run.wait(timeout=30)
    assert scene_node_ids(env.scene) == ids
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(other), 5.0)


def test_cancel_while_the_model_loads_is_prompt(case, env, monkeypatch):
    """Loading a Keras model cannot be interrupted; the run must not wait for it (stood in for by
    a resolve_model that takes 5 s)."""
    import time

    echoes, qsm, tes = _small_inputs(case)

    def slow_resolve(model=None, method="lstm", protocol=None):
        time.sleep(5.0)
        raise AssertionError("the cancelled run went on after loading")

    monkeypatch.setattr(predict, "resolve_model", slow_resolve)
    run = module.OEFPredictorLogic().startPrediction(echoes, qsm, echoTimesMs=tes, model="model.keras", device="cpu",
                                                     method="lstm")
    time.sleep(0.2)
    t0 = time.perf_counter()
    run.cancel()
    ids = scene_node_ids(env.scene)
    with pytest.raises(CancelledError):
        run.wait(timeout=10)
    assert time.perf_counter() - t0 < 1.0 and scene_node_ids(env.scene) == ids


def test_quality_and_interval_maps_reach_the_outputs(case, env):
    from slicer_testing import fake_prediction_job

    echoes, qsm, tes = _small_inputs(case)
    extra = ("OEF_p05", "OEF_p95", "OEF_width")
    seen = []
    logic = module.OEFPredictorLogic(jobFactory=fake_prediction_job(extra_maps=extra, seen=seen))
    outputs = logic.process(echoes, qsm, echoTimesMs=tes)
    inputs, method = seen[0]
    from OEFPredictorLib import methods

    # no method chosen: the engine resolves it (a model file's card, else the default)
    assert predict.resolve_method(method, None)[0].name == methods.DEFAULT_METHOD
    assert inputs.spacing == pytest.approx(echoes[0].GetSpacing())  # the spatial model resamples with it
    assert set(outputs) == set(maptable.BASE) | set(extra) and "quality" in outputs
    assert outputs["OEF_width"].GetAttribute("OEFPredictor.Unit") == "pp"
    assert outputs["OEF_p95"].GetAttribute("OEFPredictor.Unit") == "%"
    for name in ("quality",) + extra:
        node = outputs[name]
        assert node.GetAttribute("OEFPredictor.Map") == name
        assert float(slicer.util.arrayFromVolume(node).max()) == list(outputs).index(name) + 1
        display = node.GetDisplayNode()
        assert display is not None and not display.GetAutoWindowLevel()
        assert display.GetColorNodeID() != "vtkMRMLColorTableNodeGrey"  # a colour map, not grey
    oef_display = outputs["OEF"].GetDisplayNode()
    assert outputs["OEF_p05"].GetDisplayNode().GetColorNodeID() == oef_display.GetColorNodeID()
    assert outputs["OEF_p95"].GetDisplayNode().GetWindow() == pytest.approx(oef_display.GetWindow())


def test_the_field_strength_comes_from_dicom_or_the_panel_never_assumed(case, env):
    """Echoes without the DICOM MagneticFieldStrength and no field strength given: refused in one
    message, nothing added to the scene; the attribute of 7 T DICOM echoes is used, and a given
    value wins."""
    patient, _ = case
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    tes = patient.protocol.echo_times_ms
    logic = module.OEFPredictorLogic()
    plain = add_echo_volumes(patient, dicom_field=False)
    before = scene_node_ids(env.scene)
    with pytest.raises(InputError, match="field strength is unknown"):
        logic.process(plain, qsm, echoTimesMs=tes, method="nlls", device="cpu")
    assert scene_node_ids(env.scene) == before
    for node in plain:
        node.SetAttribute("DICOM.MagneticFieldStrength", "7")
    inputs, _ = logic.prediction.collectInputs(plain, qsm, echoTimesMs=tes)
    assert inputs.protocol.field_strength == 7.0
    outputs = logic.process(plain, qsm, echoTimesMs=tes, method="nlls", device="cpu")
    assert outputs["OEF"].GetAttribute("OEFPredictor.FieldStrength") == "7"  # the field used, recorded
    inputs, _ = logic.prediction.collectInputs(plain, qsm, echoTimesMs=tes, fieldStrength=1.5)
    assert inputs.protocol.field_strength == 1.5
    seq, _browser = add_echo_sequence(patient)
    assert logic.prediction.fieldStrengthFromNodes(seq) == patient.protocol.field_strength


def test_a_field_map_volume_corrects_the_echoes_as_the_engine_does_and_needs_its_unit(case, env):
    """A field map node (here in rad/s) reaches the engine in Hz: the outputs are the engine's run on
    the same arrays with that field map. Without its unit, or on another grid, the run is refused
    before it starts, and the scene is as it was."""
    from OEFPredictorLib import fieldmap

    patient, model_path = case
    echoes = add_echo_volumes(patient)
    qsm = slicer.util.addVolumeFromArray(patient.qsm, ijk_to_ras(patient.geometry), "QSM")
    field_hz = 3.0 * np.indices(patient.qsm.shape)[0].astype(np.float32)  # 3 Hz per voxel along z
    field_hz[~patient.mask] = 0.0
    rad_s = (2 * np.pi * field_hz).astype(np.float32)
    field_node = slicer.util.addVolumeFromArray(rad_s, ijk_to_ras(patient.geometry), "field map")
    other_grid = slicer.util.addVolumeFromArray(rad_s[:, :-1], ijk_to_ras(patient.geometry), "cropped field map")
    logic = module.OEFPredictorLogic()
    run = dict(echoTimesMs=patient.protocol.echo_times_ms, model=str(model_path), method="lstm", device="cpu")
    before_ids = scene_node_ids(env.scene)
    with pytest.raises(InputError, match="unit of the field map 'field map' is not set"):
        logic.process(echoes, qsm, fieldMap=field_node, **run)
    with pytest.raises(InputError, match="field map volume 'cropped field map' is not on the same voxel grid"):
        logic.process(echoes, qsm, fieldMap=other_grid, fieldMapUnits="rad/s", **run)
    assert scene_node_ids(env.scene) == before_ids
    outputs = logic.process(echoes, qsm, fieldMap=field_node, fieldMapUnits="rad/s", **run)
    inputs = predict.PredictionInputs(patient.echoes.astype(np.float32), patient.qsm.astype(np.float32),
                                      patient.protocol,
                                      field_map=fieldmap.to_hz(rad_s, "rad/s", patient.protocol.field_strength))
    expected = predict.predict_maps(inputs, model=str(model_path), method="lstm", device="cpu")
    for name in MAPS:
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputs[name]), expected.maps[name])
    uncorrected = _engine(patient, model_path)
    # the tiny untrained LSTM barely reads its inputs; the quality map shows which echoes it was given
    assert not np.allclose(uncorrected.maps["quality"], expected.maps["quality"])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(field_node), rad_s)  # the user's node as it was
