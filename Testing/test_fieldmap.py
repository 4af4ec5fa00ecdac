"""The correction of macroscopic field gradients (OEFPredictorLib/fieldmap.py), from the field
differences across a voxel to a whole prediction through the engine and the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_cli_predict import files, model, run_cli  # noqa: F401 (fixtures: a small patient on file, a tiny model)


def _linear_field(shape, per_voxel_hz):
    """A field that changes by per_voxel_hz[axis] Hz from one voxel to the next along each axis."""
    z, y, x = np.indices(shape, dtype=np.float64)
    return per_voxel_hz[0] * z + per_voxel_hz[1] * y + per_voxel_hz[2] * x


def test_field_steps_of_a_linear_field_are_exact_inside_the_mask_and_at_its_edge():
    from OEFPredictorLib import fieldmap

    shape = (9, 10, 11)
    mask = np.zeros(shape, bool)
    mask[2:7, 1:9, 3:10] = True
    mask[4, 4, 6] = False  # a hole: its neighbours use one-sided differences
    field = _linear_field(shape, (3.0, -1.5, 0.5)) + 20.0
    field[~mask] = 1e6  # outside the brain a pipeline writes anything (0, NaN): never used
    steps = fieldmap.voxel_field_steps(field, mask)
    for axis, expected in enumerate((3.0, -1.5, 0.5)):
        np.testing.assert_allclose(steps[axis][mask], expected, atol=1e-9)
    lone = np.zeros(shape, bool)
    lone[4, 4, 4] = True  # no neighbour along any axis: no gradient can be seen
    np.testing.assert_array_equal(fieldmap.voxel_field_steps(field, lone)[:, 4, 4, 4], 0.0)
    field[3, 3, 5] = np.nan
    assert np.all(np.isnan(fieldmap.voxel_field_steps(field, mask)[:, 3, 3, 5]))


def test_dephasing_is_the_product_of_the_physics_sinc_over_the_axes():
    from OEFPredictorLib import fieldmap, physics

    protocol = physics.Protocol.default()
    steps = np.array([[0.0, 10.0, 0.0, 10.0], [0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    g = fieldmap.dephasing(steps, protocol)
    np.testing.assert_allclose(g[0], 1.0)
    # 10 Hz across the voxel: phases spread over 2 pi 10 t, i.e. a gradient of 2 pi 10 rad/s per voxel
    one = physics.gradient_factor(2 * np.pi * 10.0, 1.0, protocol)
    np.testing.assert_allclose(g[1], one)
    np.testing.assert_allclose(g[3], one * physics.gradient_factor(2 * np.pi * 5.0, 1.0, protocol))
    # against the direct average of the voxel's phases (the definition)
    u = (np.arange(20000) + 0.5) / 20000 - 0.5
    direct = np.abs(np.mean(np.exp(2j * np.pi * 10.0 * u[:, None] * protocol.te), axis=0))
    np.testing.assert_allclose(g[1], direct, atol=1e-6)


def test_correction_restores_echoes_dephased_by_a_linear_gradient_and_leaves_lost_voxels_out():
    from OEFPredictorLib import fieldmap, physics

    protocol = physics.Protocol.default()
    shape = (6, 7, 8)
    mask = np.ones(shape, bool)
    field = _linear_field(shape, (4.0, 0.0, 0.0))
    field[:, :, 6:] += _linear_field(shape, (0.0, 0.0, 16.0))[:, :, 6:] - 16.0 * 6  # steep at one end: lost
    rng = np.random.default_rng(0)
    clean = (rng.uniform(0.5, 1.0, shape)[..., None] * np.exp(-20.0 * protocol.te)).astype(np.float32)
    g = fieldmap.dephasing(fieldmap.voxel_field_steps(field, mask), protocol)
    dephased = (clean * g).astype(np.float32)
    before = dephased.copy()
    corrected, untrusted = fieldmap.correct_echoes(dephased, field, mask, protocol)
    np.testing.assert_array_equal(dephased, before)  # the caller's array is not changed
    expected_lost = g[..., -1] < fieldmap.MIN_DEPHASING
    assert expected_lost.any() and not expected_lost.all()
    np.testing.assert_array_equal(untrusted, expected_lost)
    np.testing.assert_allclose(corrected[~untrusted], clean[~untrusted], rtol=1e-5)


def test_field_map_units():
    from OEFPredictorLib import fieldmap, physics

    ppm_at_3t = fieldmap.to_hz(np.array([1.0]), "ppm", 3.0)[0]
    assert ppm_at_3t == pytest.approx(physics.GAMMA * 3.0 * 1e-6 / (2 * np.pi), rel=1e-6)  # 127.7 Hz
    assert fieldmap.to_hz(np.array([2 * np.pi]), "rad/s", 3.0)[0] == pytest.approx(1.0, rel=1e-6)
    assert fieldmap.unit_named(" hz") == "Hz" and fieldmap.unit_named("Tesla") == "T"
    assert fieldmap.unit_named("gauss") is None


def test_the_engine_with_a_field_map_maps_dephased_echoes_as_the_undephased_ones(tiny_noisy_dataset):
    """A gradient of 6 Hz per 4 mm voxel along z (1.5 Hz/mm, common near the sinuses at 3 T) moves the
    bundled model's OEF map by points; with the field map the map is the one of the same echoes
    without the gradient."""
    from OEFPredictorLib import fieldmap, predict, simulate

    p = simulate.load_patient(tiny_noisy_dataset / "P03", with_truth=False)
    field = _linear_field(p.mask.shape, (6.0, 0.0, 0.0))
    field[~p.mask] = 0.0  # as a QSM pipeline writes it
    g = fieldmap.dephasing(fieldmap.voxel_field_steps(field, p.mask), p.protocol)
    dephased = np.where(p.mask[..., None], p.echoes * g, p.echoes).astype(np.float32)

    def oef(echoes, field_map=None):
        inputs = predict.PredictionInputs(echoes, p.qsm, p.protocol, mask=p.mask, spacing=p.geometry.spacing,
                                          field_map=field_map)
        result = predict.predict_maps(inputs, method="context")
        return result.maps["OEF"][p.mask], result

    reference, _ = oef(p.echoes)
    uncorrected, _ = oef(dephased)
    corrected, result = oef(dephased, field)
    assert np.mean(np.abs(uncorrected - reference)) > 2.0
    assert np.max(np.abs(corrected - reference)) < 0.1
    assert result.mask[p.mask].all() and not any("left out" in w for w in result.warnings)

    z = np.indices(p.mask.shape)[0]
    top = int(np.nonzero(p.mask)[0].max()) - 2  # the top slices get 36 Hz per voxel: under half of the signal left
    steep = np.where(z >= top, field + 30.0 * (z - top + 1), field)
    steep[~p.mask] = 0.0
    _, lost = oef(np.where(p.mask[..., None], p.echoes * fieldmap.dephasing(
        fieldmap.voxel_field_steps(steep, p.mask), p.protocol), p.echoes).astype(np.float32), steep)
    n_lost = int(np.count_nonzero(p.mask & ~lost.mask))
    assert n_lost > 0 and any(f"{n_lost} voxel(s)" in w and "field map" in w for w in lost.warnings)


def test_predict_reads_a_field_map_in_the_unit_given_or_its_sidecar_and_never_assumes_one(capsys, tmp_path,
                                                                                         files, model):
    from OEFPredictorLib import io

    echoes, qsm, mask = files["arrays"]
    field = _linear_field(qsm.shape, (2.0, 0.0, 0.0)).astype(np.float32)
    path = tmp_path / "fieldmap.nii.gz"
    io.write_volume(field, files["geometry"], path)
    argv = ["predict", "--echoes", files["echoes"], "--qsm", files["qsm"], "--mask", files["mask"], "--model", model,
            "--field-map", path]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "no_unit")
    assert code == 2 and "unit of the field map fieldmap.nii.gz is unknown" in err and "--field-map-units" in err
    assert not (tmp_path / "no_unit").exists()

    code, _, err = run_cli(capsys, *argv, "--field-map-units", "Hz", "--out", tmp_path / "hz")
    assert code == 0, err
    assert "no field map given" not in err
    code, _, err = run_cli(capsys, *argv[:-2], "--out", tmp_path / "without")
    assert code == 0 and "note: no field map given" in err and "--field-map" in err  # what was not corrected
    record = json.loads((tmp_path / "hz" / "prediction.json").read_text())
    assert record["inputs"]["field_map"] == str(path) and record["inputs"]["field_map_units"] == "Hz"

    (tmp_path / "fieldmap.json").write_text(json.dumps({"Units": "rad/s"}))  # BIDS: the sidecar says it
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "sidecar")
    assert code == 0, err
    assert json.loads((tmp_path / "sidecar" / "prediction.json").read_text())["inputs"]["field_map_units"] == "rad/s"
    hz = io.read_volume(tmp_path / "hz" / "oef.nii.gz")[0]
    rad = io.read_volume(tmp_path / "sidecar" / "oef.nii.gz")[0]
    assert not np.allclose(hz, rad)  # the same numbers in rad/s are 2 pi smaller fields

    small = tmp_path / "fieldmap_small.nii.gz"
    io.write_volume(field[:, :-2], files["geometry"], small)
    code, _, err = run_cli(capsys, *argv[:-1], small, "--field-map-units", "Hz", "--out", tmp_path / "small")
    assert code == 2 and "not on the same voxel grid" in err and "field map" in err


def test_a_field_map_that_leaves_no_voxel_says_so(tiny_noisy_dataset):
    """A field map in the wrong unit (rad/s read as Hz: 2 pi too steep) can leave every voxel below
    the trusted signal: one line naming the field map and its unit, not an empty mask."""
    from OEFPredictorLib import predict, simulate

    p = simulate.load_patient(tiny_noisy_dataset / "P03", with_truth=False)
    field = _linear_field(p.mask.shape, (200.0, 200.0, 200.0))
    inputs = predict.PredictionInputs(p.echoes, p.qsm, p.protocol, mask=p.mask, field_map=field)
    with pytest.raises(predict.InputError, match="field map's gradients take more than half .* its unit"):
        predict.predict_maps(inputs, method="nlls")

