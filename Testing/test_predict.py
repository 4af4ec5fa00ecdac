"""The prediction engine (predict_maps), its background job, and reading echo series."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from predict_testutils import tiny_model_path


@pytest.fixture(scope="module")
def bundle(tiny_dataset):
    from OEFPredictorLib import models

    return models.load_bundle(tiny_model_path(str(tiny_dataset)))


@pytest.fixture(scope="module")
def patient(tiny_dataset):
    """A 12-slice slab of the tiny patient: enough voxels for several chunks, fast on 2 cores."""
    import dataclasses

    from OEFPredictorLib import simulate

    p = simulate.load_patient(tiny_dataset / "P01")
    z = slice(16, 28)
    return dataclasses.replace(p, echoes=p.echoes[z].copy(), qsm=p.qsm[z].copy(), mask=p.mask[z].copy(),
                               truth={k: v[z].copy() for k, v in p.truth.items()})


def make_inputs(patient, **kw):
    from OEFPredictorLib import predict

    args = dict(echoes=patient.echoes, qsm=patient.qsm, protocol=patient.protocol, mask=patient.mask)
    args.update(kw)
    return predict.PredictionInputs(**args)


def plain_keras_maps(bundle, patient, mask):
    """The reference: every window at once through model.predict, decoded and clamped."""
    from OEFPredictorLib import models, physics, sequences

    idx = np.flatnonzero(mask)
    e = patient.echoes.reshape(-1, patient.echoes.shape[-1])[idx]
    q = patient.qsm.reshape(-1)[idx]
    features, echo1 = sequences.voxel_features(e, q, bundle.qsm_scale)
    windows = sequences.make_windows(features, 0, len(features), bundle.window_length, bundle.window_target)
    raw = bundle.model.predict(windows, verbose=0)
    return idx, physics.clamp_to_bounds(models.decode_outputs(raw, echo1, bundle.output_scaling), s0_scale=echo1)


def test_engine_equals_plain_model_predict_across_chunks(bundle, patient):
    from OEFPredictorLib import physics, predict

    # small chunks and batches: windows cross chunk and batch boundaries
    result = predict.predict_maps(make_inputs(patient), model=bundle, device="cpu", chunk_voxels=3001,
                                  batch_size=700)
    idx, ref = plain_keras_maps(bundle, patient, patient.mask)
    for name in physics.PARAMETER_NAMES:
        got = result.maps[name].reshape(-1)[idx]
        np.testing.assert_allclose(got, ref[name], rtol=2e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(result.maps["OEF"].reshape(-1)[idx], 100 * (1 - ref["Y"] / 0.98), rtol=1e-5, atol=1e-4)
    assert set(result.maps) == {"OEF", "S0", "R2", "Y", "v", "chi_nb", "quality"}
    for name, m in result.maps.items():
        assert m.dtype == np.float32 and m.shape == patient.qsm.shape
        assert np.all(m[~patient.mask] == 0), name
    assert result.device == "cpu" and result.model_card["sha256"] == bundle.card["sha256"]
    # clamped to the hard bounds (S0 relative to echo 1)
    inside = patient.mask
    for name in ("R2", "Y", "v", "chi_nb"):
        lo, hi = physics.BOUNDS[name]
        assert result.maps[name][inside].min() >= lo - 1e-6 and result.maps[name][inside].max() <= hi + 1e-6


def test_quality_map_is_the_forward_model_residual(patient):
    from OEFPredictorLib import physics, predict

    idx = np.flatnonzero(patient.mask)
    e = patient.echoes.reshape(-1, 8)[idx]
    q = patient.qsm.reshape(-1)[idx]
    truth = {n: patient.truth[n].reshape(-1)[idx] for n in physics.PARAMETER_NAMES}
    exact = predict.quality_map(e, q, truth, patient.protocol)  # noise-free data: the truth explains it
    assert np.percentile(exact, 99) < 1e-3
    wrong = dict(truth, Y=np.clip(truth["Y"] - 0.2, 0.01, 0.98))
    assert np.median(predict.quality_map(e, q, wrong, patient.protocol)) > 20 * np.median(exact) + 1e-3


def test_nan_voxels_are_masked_with_a_warning_and_do_not_spread(bundle, patient):
    from OEFPredictorLib import predict

    echoes = patient.echoes.copy()
    qsm = patient.qsm.copy()
    idx = np.flatnonzero(patient.mask)
    bad = idx[[100, 2000, 4000]]
    echoes.reshape(-1, 8)[bad[0], 3] = np.nan
    echoes.reshape(-1, 8)[bad[1], 0] = np.inf
    qsm.reshape(-1)[bad[2]] = np.nan
    result = predict.predict_maps(make_inputs(patient, echoes=echoes, qsm=qsm), model=bundle, device="cpu")
    assert any("3 voxel(s) with NaN/Inf" in w for w in result.warnings)
    clean_mask = patient.mask.copy()
    clean_mask.reshape(-1)[bad] = False
    clean = predict.predict_maps(make_inputs(patient, mask=clean_mask), model=bundle, device="cpu")
    for name, m in result.maps.items():
        assert np.all(np.isfinite(m)), name
        assert np.all(m.reshape(-1)[bad] == 0), name
        np.testing.assert_array_equal(m, clean.maps[name], err_msg=name)
    assert not result.mask.reshape(-1)[bad].any()


def test_derived_mask_matches_the_brain(bundle, patient):
    from OEFPredictorLib import predict

    result = predict.predict_maps(make_inputs(patient, mask=None), model=bundle, device="cpu")
    assert result.mask_derived
    m, truth = result.mask, patient.mask
    dice = 2 * (m & truth).sum() / (m.sum() + truth.sum())
    assert dice > 0.95, dice


def test_cmro2_from_cbf(bundle, patient):
    from OEFPredictorLib import predict

    cbf = np.where(patient.mask, 50.0, 0.0).astype(np.float32)
    result = predict.predict_maps(make_inputs(patient, cbf=cbf), model=bundle, device="cpu")
    inside = patient.mask
    np.testing.assert_allclose(result.maps["CMRO2"][inside], 50.0 * result.maps["OEF"][inside] / 100 * 7.377,
                               rtol=1e-5)
    assert np.all(result.maps["CMRO2"][~inside] == 0)


@pytest.mark.parametrize("change, message", [
    (lambda i: dict(qsm=i.qsm[:-1]), "differ in size"),
    (lambda i: dict(echoes=i.echoes[..., :7]), "7 echoes"),
    (lambda i: dict(mask=np.zeros_like(i.mask)), "mask is empty"),
    (lambda i: dict(echoes=i.echoes[5], qsm=i.qsm[5]), "2D"),
    (lambda i: dict(mask=i.mask[:, :-1]), "differ in size"),
])
def test_validate_refuses_bad_arrays(patient, change, message):
    from OEFPredictorLib.errors import InputError

    base = make_inputs(patient)
    bad = make_inputs(patient, **change(base))
    with pytest.raises(InputError, match=message):
        bad.validate()


def test_a_predictor_names_the_model_protocol(patient, bundle):
    """The one check of a protocol against a model: building the method with its acquisition."""
    from OEFPredictorLib import methods, physics, predict
    from OEFPredictorLib.errors import InputError

    other = physics.Protocol.from_milliseconds([5 + 5 * i for i in range(8)])
    with pytest.raises(InputError, match=r"model's \(8 echoes at TE = \[4.5, 9.5"):
        predict.Predictor(methods.of_card(bundle.card), bundle, other)
    with pytest.raises(InputError, match=r"differs in its echo times"):
        predict.predict_maps(make_inputs(patient, protocol=other), bundle)
    assert predict.Predictor.build(patient.protocol, None, bundle).method.name == methods.of_card(bundle.card).name


def test_device_choice(bundle, patient):
    from OEFPredictorLib import predict
    from OEFPredictorLib.errors import InputError

    with pytest.raises(InputError, match="Unknown device"):
        predict.predict_maps(make_inputs(patient), model=bundle, device="tpu")
    if not predict.gpu_available():
        with pytest.raises(InputError, match="sees no GPU"):
            predict.predict_maps(make_inputs(patient), model=bundle, device="gpu")
        assert predict.predict_maps(make_inputs(patient), model=bundle, device="auto", chunk_voxels=50_000).device == "cpu"


def test_chunk_size_follows_the_memory_budget(bundle):
    from OEFPredictorLib import predict

    small = predict.chunk_size_for(bundle, 9, 16)
    large = predict.chunk_size_for(bundle, 9, 256)
    assert predict.MIN_CHUNK <= small < large <= predict.MAX_CHUNK


def test_cancel_is_prompt_and_leaves_nothing(bundle, patient):
    from OEFPredictorLib import predict
    from OEFPredictorLib.errors import CancelledError

    cancel = threading.Event()
    state = {}

    def slow_progress(fraction, message):
        if message.startswith("Predicting") and "t_cancel" not in state:
            state["t_cancel"] = time.perf_counter()
            cancel.set()

    with pytest.raises(CancelledError):
        try:
            predict.predict_maps(make_inputs(patient), model=bundle, device="cpu", progress=slow_progress,
                                 cancel_event=cancel, chunk_voxels=2000, batch_size=500)
        finally:
            state["t_end"] = time.perf_counter()
    assert state["t_end"] - state["t_cancel"] < 2.0


def _slowed(job, delay=0.02):
    """Slow the job's progress reports so a tiny model's run lasts long enough to cancel."""
    original = job._on_progress

    def slow(fraction, message):
        original(fraction, message)
        time.sleep(delay)

    job._on_progress = slow
    return job


def test_job_runs_in_the_background_and_reports_progress(bundle, patient):
    from OEFPredictorLib import predict

    job = predict.PredictionJob(make_inputs(patient), model=bundle, device="cpu", chunk_voxels=5000)
    assert not job.running and not job.done and job.result is None
    with pytest.raises(RuntimeError, match="not started"):
        job.wait()
    job.start()
    with pytest.raises(RuntimeError, match="already been started"):
        job.start()
    result = job.wait(timeout=120)
    assert job.done and not job.running and not job.cancelled and job.error is None
    assert job.result is result and result.maps["OEF"][patient.mask].mean() > 0
    events = job.poll_events()
    fractions = [f for f, _ in events]
    assert len(events) >= 5 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Predicting" in m for _, m in events)
    assert job.poll_events() == []  # a queue: each event once
    with pytest.raises(RuntimeError):
        job.start()  # still one run per job


def test_job_cancel_gives_no_result(bundle, patient):
    from OEFPredictorLib import predict
    from OEFPredictorLib.errors import CancelledError

    job = _slowed(predict.PredictionJob(make_inputs(patient), model=bundle, device="cpu", chunk_voxels=2000,
                                        batch_size=250))
    job.start()
    deadline = time.perf_counter() + 60
    while not any("Predicting" in m for _, m in job.poll_events()):
        assert time.perf_counter() < deadline and job.running
        time.sleep(0.01)
    t0 = time.perf_counter()
    job.cancel()
    with pytest.raises(CancelledError):
        job.wait(timeout=30)
    assert time.perf_counter() - t0 < 2.0
    assert job.cancelled and job.result is None and isinstance(job.error, CancelledError)


def test_job_error_is_raised_by_wait(patient, bundle):
    from OEFPredictorLib import predict
    from OEFPredictorLib.errors import InputError

    job = predict.PredictionJob(make_inputs(patient, qsm=patient.qsm[:-1]), model=bundle).start()
    with pytest.raises(InputError, match="differ in size"):
        job.wait(timeout=60)
    assert job.result is None and isinstance(job.error, InputError) and not job.cancelled


def test_baseline_methods_dispatch_to_baselines(patient, monkeypatch):
    """A method other than lstm/dnn runs baselines.predict_voxels on the in-mask voxel rows."""
    from OEFPredictorLib import baselines, physics, predict

    calls = {}

    def fake(method, echoes, qsm, protocol, progress=None, cancel_event=None):
        calls.update(method=method, n=len(echoes), n_echoes=echoes.shape[1])
        idx = np.flatnonzero(patient.mask)
        return {n: patient.truth[n].reshape(-1)[idx] for n in physics.PARAMETER_NAMES}

    monkeypatch.setattr(baselines, "predict_voxels", fake)
    result = predict.predict_maps(make_inputs(patient), method="nlls")
    assert calls == {"method": "nlls", "n": int(patient.mask.sum()), "n_echoes": 8}
    np.testing.assert_allclose(result.maps["Y"][patient.mask], patient.truth["Y"][patient.mask], rtol=1e-6)
    assert result.model_card is None and np.percentile(result.maps["quality"][patient.mask], 99) < 1e-3


# --- Reading echo series ----------------------------------------------------------------------
def write_dicom_series(volume, geometry, folder, echo_time_ms, series_uid, instance_offset=0):
    """Write a 3D int16 volume as DICOM slices (SimpleITK/GDCM), with EchoTime."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(volume.astype(np.int16))
    geometry.apply_to(image)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                           "0020|000e": series_uid, "0020|0011": "1",
                           "0020|0013": str(instance_offset + k + 1), "0018|0081": f"{echo_time_ms:g}",
                           "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                           "0020|0037": "\\".join(f"{v:.6f}" for v in (geometry.direction[0], geometry.direction[3],
                                                                        geometry.direction[6], geometry.direction[1],
                                                                        geometry.direction[4], geometry.direction[7])),
                           "0008|0018": f"{series_uid}.{instance_offset + k + 1}"}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{instance_offset + k:05d}.dcm"))
        writer.Execute(s)


def test_echoes_read_alike_from_4d_3d_list_and_dicom(tmp_path, patient):
    from OEFPredictorLib import io

    e = patient.echoes[:, :20, :]
    echoes = np.round(e / e.max() * 30000.0).astype(np.float32)  # integer values that fit DICOM int16
    g = patient.geometry
    io.write_volume(echoes, g, tmp_path / "megre.nii.gz")
    io.write_json({"EchoTime": [t / 1000 for t in patient.protocol.echo_times_ms]}, tmp_path / "megre.json")
    files = []
    for e, te in enumerate(patient.protocol.echo_times_ms):
        files.append(tmp_path / f"echo{e + 1}.nrrd")
        io.write_volume(echoes[..., e], g, files[-1])
        io.write_json({"EchoTime": te / 1000}, tmp_path / f"echo{e + 1}.json")
        # one multi-echo series: all echoes share the series UID, told apart by EchoTime
        write_dicom_series(echoes[..., e], g, tmp_path / "dicom", te, "1.2.826.0.1.3680043.2.1125.2",
                           instance_offset=1000 * e)

    a4, g4, te4, _ = io.read_echo_series([tmp_path / "megre.nii.gz"])
    a3, g3, te3, _ = io.read_echo_series(files)
    ad, gd, ted, _ = io.read_echo_series([tmp_path / "dicom"])
    np.testing.assert_array_equal(a4, echoes)
    np.testing.assert_array_equal(a3, echoes)
    np.testing.assert_array_equal(ad, echoes)
    assert g4.matches(g) and g3.matches(g) and gd.matches(g)
    for tes in (te4, te3, ted):
        np.testing.assert_allclose(tes, patient.protocol.echo_times_ms, atol=1e-6)


def test_cancel_after_the_run_ended_discards_the_result(bundle, patient):
    """A Cancel pressed while the run finishes must still mean 'nothing is written'."""
    from OEFPredictorLib import predict
    from OEFPredictorLib.errors import CancelledError

    job = predict.PredictionJob(make_inputs(patient), model=bundle, device="cpu").start()
    while job.running:
        time.sleep(0.01)
    job.cancel()  # the result exists but has not been taken
    with pytest.raises(CancelledError):
        job.wait()
    assert job.cancelled and job.result is None


def test_no_mask_gives_no_warning_about_the_background(bundle, patient):
    from OEFPredictorLib import predict

    # Skull-stripped style input: zero background, which is not 'invalid data' worth a warning.
    echoes = np.where(patient.mask[..., None], patient.echoes, 0).astype(np.float32)
    result = predict.predict_maps(make_inputs(patient, echoes=echoes, mask=None), model=bundle, device="cpu")
    assert result.mask_derived and result.mask.sum() > 0.9 * patient.mask.sum()
    assert not any("NaN/Inf" in w for w in result.warnings), result.warnings


def test_dicom_folder_with_magnitude_and_phase_series_is_refused(tmp_path, patient):
    """Two series with the same echo times (magnitude + phase) must not be merged into one echo."""
    from OEFPredictorLib import io
    from OEFPredictorLib.errors import InputError

    volume = np.round(patient.echoes[:6, :20, :, 0] / patient.echoes.max() * 30000.0)
    for te in patient.protocol.echo_times_ms[:2]:
        write_dicom_series(volume, patient.geometry, tmp_path / "dicom", te, "1.2.826.0.1.3680043.2.1125.3",
                           instance_offset=int(te * 100))
        write_dicom_series(-volume, patient.geometry, tmp_path / "dicom", te, "1.2.826.0.1.3680043.2.1125.4",
                           instance_offset=50_000 + int(te * 100))
    with pytest.raises(InputError, match="share the echo time"):
        io.read_echo_series([tmp_path / "dicom"])
