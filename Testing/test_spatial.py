"""The spatial model: stroke-like patients, the U-Net, resampling, tiling, the interval, its training,
its place in the engine and in evaluate (real Keras, real SimpleITK files, tiny volumes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from OEFPredictorLib import decay, evaluate, maptable, methods, models, phantom, physics, predict, spatial
from OEFPredictorLib.training import calibration
from OEFPredictorLib.training import unet as train_spatial
from OEFPredictorLib.errors import InputError
from predict_testutils import tiny_spatial_model_path


# --- Stroke-like virtual patients ------------------------------------------------------------
@pytest.fixture(scope="module")
def stroke_patients():
    return [phantom.make_patient(seed, phantom.PatientConfig.stroke(4.0, wide_priors=seed % 2 == 0))
            for seed in range(4)]


def test_stroke_patients_have_several_lesions_of_both_kinds(stroke_patients):
    kinds = [l["type"] for p in stroke_patients for l in p.lesions]
    shapes = {l["shape"] for p in stroke_patients for l in p.lesions}
    assert len(kinds) >= 8 and {"misery_perfusion", "infarct_core"} <= set(kinds)
    assert len(shapes) >= 3
    for p in stroke_patients:
        oef = p.oef_percent
        if (p.lesion_map == 1).sum() >= 3:
            assert oef[p.lesion_map == 1].mean() > oef[p.metric_mask & (p.lesion_map == 0)].mean() + 5
        if (p.lesion_map == 2).sum() >= 3:
            assert oef[p.lesion_map == 2].mean() < oef[p.metric_mask & (p.lesion_map == 0)].mean() - 10


def test_misery_perfusion_raises_blood_volume():
    """Misery perfusion dilates vessels: v inside the lesion above its contralateral mirror."""
    ratios = []
    for seed in range(10):
        p = phantom.make_patient(seed, phantom.PatientConfig.stroke(4.0, lesion_shapes=("sphere",),
                                                                    lesion_size_mm=(20.0, 25.0)))
        les, mirror = p.lesion_map == 1, p.lesion_map == 3
        if les.sum() >= 5 and mirror.sum() >= 5:
            ratios.append(p.params["v"][les].mean() / p.params["v"][mirror].mean())
    assert len(ratios) >= 3 and np.median(ratios) > 1.1


def test_cortical_shapes_follow_the_cortex():
    """Territory lesions lie in the outer ribbon of the brain, not deep in the white matter."""
    from scipy import ndimage

    depths = []
    for seed in range(6):
        p = phantom.make_patient(seed, phantom.PatientConfig.stroke(4.0, lesion_shapes=("territory",)))
        depth = ndimage.distance_transform_edt(p.mask) * 4.0
        inside = (p.lesion_map == 1) | (p.lesion_map == 2)
        if inside.any():
            depths.append(np.median(depth[inside]))
    assert depths and np.median(depths) < 16.0


def test_wide_priors_vary_the_tissue_means_between_patients():
    spreads = {}
    for wide in (False, True):
        means = []
        for seed in range(6):
            p = phantom.make_patient(seed, phantom.PatientConfig.stroke(4.0, wide_priors=wide, lesions=False))
            means.append(p.oef_percent[p.metric_mask].mean())
        spreads[wide] = np.std(means)
    assert spreads[True] > 2 * spreads[False]


def test_the_paper_cohort_is_unchanged_by_the_stroke_options():
    """The original lesion model draws the same patient as before (the paper's data sets stay valid)."""
    a = phantom.make_patient(3, phantom.PatientConfig(voxel_size=4.0, lesions=True))
    b = phantom.make_patient(3, phantom.PatientConfig(voxel_size=4.0, lesions=True, lesion_shapes=("sphere",)))
    assert np.array_equal(a.params["Y"], b.params["Y"]) and a.lesions == b.lesions
    assert all("radius_mm" in l for l in a.lesions)


# --- The network and its inputs / outputs ---------------------------------------------------------
def test_unet_is_fully_convolutional_and_safe_mode_loadable(tmp_path):
    import keras

    model = models.build_model({"architecture": "unet", "filters": [4, 8, 16]}, n_outputs=spatial.N_OUTPUTS)
    for shape in ((8, 12, 16), (16, 8, 8)):
        assert model.predict_on_batch(np.zeros((1,) + shape + (9,), np.float32)).shape == (1,) + shape + (7,)
    path = tmp_path / "u.keras"
    model.save(path)
    again = keras.saving.load_model(path, compile=False, safe_mode=True)
    x = np.random.default_rng(0).random((1, 8, 8, 8, 9)).astype(np.float32)
    np.testing.assert_allclose(again.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)
    assert not any(type(l).__name__ == "Lambda" for l in model.layers)


def test_tiled_inference_matches_the_whole_volume_inside_the_tiles():
    """Overlapping tiles, blended, agree with one pass away from the tile borders, and every tile is
    at most the tile size (bounded memory)."""
    import keras

    keras.utils.set_random_seed(1)
    model = models.build_model({"architecture": "unet", "filters": [4, 8]}, n_outputs=spatial.N_OUTPUTS)
    rng = np.random.default_rng(0)
    features = rng.random((40, 36, 30, 9)).astype(np.float32)
    mask = np.zeros(features.shape[:3], bool)
    mask[4:36, 4:32, 4:26] = True
    seen = []

    def predict(x):
        seen.append(x.shape)
        return model.predict_on_batch(x)

    whole = spatial.run_network(model.predict_on_batch, features, mask, multiple=2, tile=64)
    tiled = spatial.run_network(predict, features, mask, multiple=2, tile=24, overlap=12)
    assert len(seen) >= 8 and max(max(s[1:4]) for s in seen) <= 24
    diff = np.abs(whole - tiled)[mask]
    # zero padding at tile borders changes a few voxels; the ramp keeps them a small minority
    assert np.median(diff) < 0.1 * np.abs(whole[mask]).mean()


def test_resampling_keeps_uniform_values_and_the_brain_edge():
    mask = np.zeros((20, 20, 20), bool)
    mask[3:17, 4:16, 5:15] = True
    channels = np.where(mask[..., None], np.array([1.0, 0.5], np.float32), 0.0).astype(np.float32)
    factors = spatial.resampling_factors((1.0, 1.0, 1.0), 2.0)
    grid, grid_mask = spatial.to_model_grid(channels, mask, factors)
    assert grid.shape == (10, 10, 10, 2)
    np.testing.assert_allclose(grid[grid_mask], [[1.0, 0.5]] * int(grid_mask.sum()), atol=1e-5)
    back = spatial.from_model_grid(grid, grid_mask, mask)
    assert back.shape == (int(mask.sum()), 2)
    np.testing.assert_allclose(back, [[1.0, 0.5]] * int(mask.sum()), atol=1e-5)
    assert np.all(spatial.resampling_factors((2.02, 1.98, 2.0), 2.0) == 1.0)


def test_block_average_agrees_with_smoothing_and_the_crop_changes_nothing():
    """1 mm -> 2 mm averages 2x2x2 blocks; on a smooth field that matches the general path (Gaussian of
    the block's variance, interpolated) where the grids coincide, and predicting on the brain's box
    gives the same maps as on the whole volume."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (24, 28, 20)], indexing="ij")
    mask = (z - 12) ** 2 / 100 + (y - 14) ** 2 / 144 + (x - 10) ** 2 / 64 < 1.0
    field = (np.sin(z / 7.0) + 0.05 * y + np.cos(x / 6.0)).astype(np.float32)
    channels = np.stack([field, np.ones_like(field)], -1) * mask[..., None]
    factors = spatial.resampling_factors((1.0, 1.0, 1.0), 2.0)
    assert spatial.block_factors(factors) == (2, 2, 2)
    block, block_mask = spatial.to_model_grid(channels, mask, factors)
    smooth, smooth_mask = spatial._smooth_resample(channels, mask, factors)
    assert block.shape == smooth.shape == (12, 14, 10, 2)
    assert (block_mask != smooth_mask).sum() <= 0.05 * block_mask.sum()
    from scipy import ndimage

    inner = ndimage.binary_erosion(block_mask)  # the edge differs a little more (different kernels)
    np.testing.assert_allclose(block[inner], smooth[inner], atol=0.01)
    np.testing.assert_allclose(block[block_mask & smooth_mask], smooth[block_mask & smooth_mask], atol=0.05)
    assert spatial.block_factors((2.0, 1.0, 2.0)) == (2, 1, 2) and spatial.block_factors((2.048, 2, 2)) is None
    # the brain's box, aligned to whole blocks, read in slabs: the same model grid as the whole volume's
    big = np.zeros((51, 33, 29), bool)
    big[4:28, 3:31, 7:27] = mask  # the box starts at z = 7: rounded down to 6
    big[30:50, 8:20, 9:21] = True
    box = spatial._brain_box(big, (2, 2, 2))
    assert all(b.start % 2 == 0 for b in box) and big[box].sum() == big.sum() and box[0] == slice(6, 50)
    rng = np.random.default_rng(0)
    echoes = np.where(big[..., None], rng.uniform(0.5, 1.0, big.shape + (3,)), np.nan).astype(np.float32)
    qsm = rng.normal(0.0, 0.05, big.shape).astype(np.float32)
    whole = spatial.to_model_grid(spatial.volume_features(echoes, qsm, big, 10.0), big, factors)
    slabs = spatial._model_grid_inputs(echoes, qsm, big, factors, 10.0)
    assert spatial.SLAB_BLOCKS * 2 < 46  # several slabs
    np.testing.assert_array_equal(slabs[1], whole[1])
    np.testing.assert_allclose(slabs[0], whole[0], rtol=1e-6, atol=1e-7)


def _full_grid_from_model_grid(values, grid_mask, shape):
    """The former from_model_grid: one channel interpolated over the whole data grid."""
    from scipy import ndimage

    coords = spatial._sample_coordinates(grid_mask.shape, shape)
    m = grid_mask.astype(np.float32)
    weight = ndimage.map_coordinates(m, coords, order=1, mode="nearest")
    v = ndimage.map_coordinates(values * m, coords, order=1, mode="nearest")
    near = ndimage.map_coordinates(values, coords, order=0, mode="nearest")
    return np.where(weight > 1e-3, v / np.maximum(weight, 1e-3), near).astype(np.float32)


def test_back_to_the_data_grid_at_the_mask_voxels_equals_the_whole_grid_interpolation():
    """from_model_grid interpolates only the mask's voxels, all channels at once: the same values as
    interpolating each channel over the whole grid and picking the mask, including voxels far from the
    grid mask (nearest value)."""
    rng = np.random.default_rng(3)
    grid_mask = np.zeros((9, 11, 10), bool)
    grid_mask[2:8, 3:9, 2:9] = True
    values = rng.normal(size=grid_mask.shape + (3,)).astype(np.float32)
    mask = np.zeros((17, 21, 19), bool)
    mask[3:15, 5:17, 3:17] = True
    mask[0, 0, 0] = mask[16, 20, 18] = True  # outside the grid mask's reach
    got = spatial.from_model_grid(values, grid_mask, mask)
    want = np.stack([_full_grid_from_model_grid(values[..., c], grid_mask, mask.shape)[mask] for c in range(3)], -1)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_decoded_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(100, 7)).astype(np.float32)
    scaling = {"mean": [1.1, 18, 0.6, 0.03, 0.0], "std": [0.05, 5, 0.1, 0.01, 0.05]}
    out = spatial.decode(raw, np.ones(100, np.float32), scaling, interval_scale=1.5)
    assert np.all(out["OEF_p05"] <= out["OEF"] + 1e-5) and np.all(out["OEF"] <= out["OEF_p95"] + 1e-5)
    np.testing.assert_allclose(out["OEF_width"], out["OEF_p95"] - out["OEF_p05"], atol=1e-5)
    wider = spatial.decode(raw, np.ones(100, np.float32), scaling, interval_scale=3.0)
    assert np.all(wider["OEF_width"] >= out["OEF_width"] - 1e-5)


def test_the_contrast_gain_scales_the_map_about_the_brain_median_and_the_interval_follows():
    """spatial.decode with a gain: every voxel's OEF moves to median + gain x (OEF - median), Y says the same OEF,
    and the interval is centred on the new estimate with the network's own half-widths (calibration is on the
    map after the gain)."""
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(101, 7)).astype(np.float32)
    scaling = {"mean": [1.1, 18, 0.6, 0.03, 0.0], "std": [0.05, 5, 0.1, 0.01, 0.05]}
    plain = spatial.decode(raw, np.ones(101, np.float32), scaling)
    centre = np.median(plain["OEF"])
    for gain in (0.4, 1.25):
        out = spatial.decode(raw, np.ones(101, np.float32), scaling, gain=gain)
        np.testing.assert_allclose(out["OEF"], centre + gain * (plain["OEF"] - centre), atol=1e-3)
        np.testing.assert_allclose(out["OEF"], 100 * physics.oef_from_Y(out["Y"]), atol=1e-3)
        np.testing.assert_allclose(out["OEF_p95"] - out["OEF"], plain["OEF_p95"] - plain["OEF"], atol=1e-3)
        assert np.std(out["OEF"]) == pytest.approx(gain * np.std(plain["OEF"]), rel=1e-3)
        for name in ("S0", "R2", "v", "chi_nb"):  # only OEF (and Y) carry the gain
            np.testing.assert_array_equal(out[name], plain[name])


def test_the_contrast_gain_is_a_line_in_the_noise_level_held_to_its_range():
    fit = {"intercept": -0.9, "slope": -1.0, "noise_levels": [-2.3, -1.2]}
    assert spatial.contrast_gain(fit, -2.0) == pytest.approx(1.1)
    assert spatial.contrast_gain(fit, -3.0) == pytest.approx(spatial.contrast_gain(fit, -2.3))  # cleaner than seen
    assert spatial.contrast_gain({**fit, "intercept": -1.5}, -1.0) == 0.0  # never below 0 (never inverts the map)
    assert spatial.contrast_gain(None, -2.0) == 1.0 and spatial.contrast_gain(fit, float("nan")) == 1.0
    damped = {**fit, "smallest_shrink": 0.1}  # shrinks 0.1 smaller; gains above 1 as they are
    assert spatial.contrast_gain(damped, -1.85) == 1.0  # the line says 0.95
    assert spatial.contrast_gain(damped, -1.5) == pytest.approx(0.7)  # the line says 0.6
    assert spatial.contrast_gain(damped, -2.0) == pytest.approx(1.1)


def test_the_contrast_gain_is_fitted_to_the_volumes_and_the_scores_follow():
    """calibration.contrast_gain_fit recovers gain = a + b x noise level from volumes whose estimates are their
    truths' deviations from the median divided by that gain (plus noise the gain does not see); with_contrast_gain
    then gives the estimates back near the truth, and their interval scores and abnormality on the new map."""
    rng = np.random.default_rng(2)
    volumes = []
    for level in np.linspace(-2.3, -1.3, 12):
        truth = 40.0 + rng.normal(0.0, 5.0, 4000)
        gain = -0.9 - 1.0 * level
        oef = 40.0 + (truth - 40.0) / gain + rng.normal(0.0, 0.2, truth.size)
        half = np.full(truth.size, 5.0)
        volumes.append({"oef": oef, "truth": truth, "centre": 40.0, "noise_level": level, "below": half,
                        "above": half, "scores": calibration.sided_scores(oef, truth, half, half),
                        "abnormal": np.abs(oef - 40.0)})
    fit, record = calibration.contrast_gain_fit(volumes)
    assert fit["intercept"] == pytest.approx(-0.9, abs=0.02) and fit["slope"] == pytest.approx(-1.0, abs=0.02)
    assert fit["noise_levels"] == [-2.3, -1.3] and fit["smallest_shrink"] == calibration.SMALLEST_SHRINK
    assert record["rmse_after_pp"] < 0.5 * record["rmse_before_pp"]
    after = calibration.with_contrast_gain(volumes[0], {**fit, "smallest_shrink": 0.0})
    assert np.sqrt(np.mean((after["oef"] - after["truth"]) ** 2)) < 0.5
    np.testing.assert_allclose(after["scores"], np.abs(after["oef"] - after["truth"]) / 5.0)
    np.testing.assert_allclose(after["abnormal"], np.abs(after["oef"] - 40.0))
    assert calibration.contrast_gain_fit(volumes[:2])[0] is None


def test_loss_ignores_voxels_outside_the_metric_mask_and_rewards_coverage():
    from keras import ops

    scaling = {"mean": [1.0, 18.0, 0.6, 0.03, 0.0], "std": [0.05, 5.0, 0.1, 0.01, 0.05]}
    loss = spatial.make_loss(scaling)
    y_true = np.zeros((1, 4, 4, 4, 7), np.float32)
    y_true[..., 5] = 1 - 0.6 / physics.YA  # true OEF = predicted OEF at z = 0
    y_true[..., 6] = 0.0
    y_true[0, :2, ..., 6] = 1.0  # only half the voxels count
    y_pred = np.zeros((1, 4, 4, 4, 7), np.float32)
    base = float(ops.convert_to_numpy(loss(y_true, y_pred))[0])
    y_pred_out = y_pred.copy()
    y_pred_out[0, 2:, ..., :5] = 5.0  # wrong, but outside the weight
    assert float(ops.convert_to_numpy(loss(y_true, y_pred_out))[0]) == pytest.approx(base, rel=1e-6)
    y_pred_far = y_pred.copy()
    y_true_far = y_true.copy()
    y_true_far[..., 5] += 0.3  # truth far outside a narrow interval costs more
    y_pred_far[..., 5:7] = -5.0
    assert float(ops.convert_to_numpy(loss(y_true_far, y_pred_far))[0]) > base + 1.0


def test_conformal_factor_gives_the_coverage():
    scores = np.random.default_rng(0).exponential(size=10_000)
    factor = calibration.conformal_factor(scores, 0.9)
    assert np.mean(scores <= factor) == pytest.approx(0.9, abs=0.005)


# --- Training, the card, the engine --------------------------------------------------------------
def test_training_writes_a_calibrated_bundle_and_resumes(tmp_path):
    config = train_spatial.SpatialTrainConfig(
        patients=2, validation_patients=1, calibration_patients=1, patches_per_patient=2, patch=8,
        batch_size=2, steps_per_epoch=2, epochs=1, time_limit_min=None, voxel_size_mm=4.0, filters=(4, 8))
    out = tmp_path / "u.keras"
    card = train_spatial.train(out, config, verbose=0)
    assert card["model"]["architecture"] == "unet" and card["spatial"]["voxel_size_mm"] == 4.0
    assert card["spatial"]["interval_scale"] > 0 and card["spatial"]["calibration"]["voxels"] > 100
    assert card["training"]["epochs_run"] == 1 and card["sha256"] == models.sha256_of(out)
    bundle = models.load_bundle(out)  # checksum + safe mode
    assert bundle.model.output_shape[-1] == spatial.N_OUTPUTS
    resumed = train_spatial.train(out, dataclasses_replace(config, epochs=2), resume=True, verbose=0)
    assert resumed["training"]["epochs_run"] == 2
    with pytest.raises(InputError, match="options differ"):
        train_spatial.train(out, dataclasses_replace(config, epochs=3, patch=16), resume=True, verbose=0)


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_engine_runs_the_spatial_model_with_its_interval(tiny_dataset):
    from OEFPredictorLib import simulate

    path = tiny_spatial_model_path(str(tiny_dataset))
    data = simulate.load_patient(tiny_dataset / "P01")
    inputs = predict.PredictionInputs(data.echoes, data.qsm, data.protocol, data.mask, spacing=data.geometry.spacing)
    result = predict.predict_maps(inputs, model=str(path), method="unet", device="cpu")
    assert set(maptable.INTERVAL) <= set(result.maps) and result.method == "unet"
    m = result.mask
    assert np.all(result.maps["OEF_p05"][m] <= result.maps["OEF"][m] + 1e-4)
    assert np.all(result.maps["OEF"][m] <= result.maps["OEF_p95"][m] + 1e-4)
    assert np.all(result.maps["OEF"][~m] == 0)
    # the same data on a 2x finer grid: resampled to the model's grid and back, similar maps
    fine = np.repeat(np.repeat(np.repeat(data.echoes, 2, 0), 2, 1), 2, 2)
    fine_inputs = predict.PredictionInputs(fine, np.repeat(np.repeat(np.repeat(data.qsm, 2, 0), 2, 1), 2, 2),
                                           data.protocol, np.repeat(np.repeat(np.repeat(data.mask, 2, 0), 2, 1), 2, 2),
                                           spacing=tuple(s / 2 for s in data.geometry.spacing))
    fine_result = predict.predict_maps(fine_inputs, model=str(path), method="unet", device="cpu")
    coarse_again = fine_result.maps["OEF"][::2, ::2, ::2]
    inner = data.metric_mask & (np.abs(np.diff(data.mask.astype(int), axis=0, prepend=0)) == 0)
    assert np.median(np.abs(coarse_again - result.maps["OEF"])[inner]) < 3.0


def test_a_voxelwise_model_is_refused_for_the_spatial_method(tiny_dataset):
    from OEFPredictorLib import simulate
    from predict_testutils import tiny_model_path

    data = simulate.load_patient(tiny_dataset / "P01")
    inputs = predict.PredictionInputs(data.echoes, data.qsm, data.protocol, data.mask)
    with pytest.raises(InputError, match="cannot run as method 'unet'"):
        predict.predict_maps(inputs, model=str(tiny_model_path(str(tiny_dataset))), method="unet", device="cpu")


def test_without_a_method_the_model_file_decides(tiny_dataset):
    from OEFPredictorLib import simulate
    from predict_testutils import tiny_model_path

    lstm_path = tiny_model_path(str(tiny_dataset))
    spec, bundle = predict.resolve_method(None, str(lstm_path))
    assert spec.name == "lstm" and bundle.path.name == lstm_path.name
    spec, _ = predict.resolve_method(None, str(tiny_spatial_model_path(str(tiny_dataset))))
    assert spec.name == "unet"
    assert predict.resolve_method("nlls", None) == (methods.METHODS["nlls"], None)


def test_every_method_kind_has_a_runner_and_the_default_ships_a_model():
    from OEFPredictorLib import resources

    assert set(predict.RUNNERS) == set(methods.KINDS)
    assert all(m.kind in methods.KINDS for m in methods.METHODS.values())
    default = methods.get(None)
    assert default.name == methods.DEFAULT_METHOD and resources.resource_path("Models", default.model_file).exists()
    assert methods.get("LSTM").label == "LSTM (paper)"
    for m in methods.METHODS.values():  # every bundled model's card says it was trained for its method
        for name in m.model_files:
            card = json.loads(resources.resource_path("Models", name).with_suffix(".json").read_text())
            assert methods.of_card(card) is m
    with pytest.raises(InputError, match="choose one of"):
        methods.get("svm")


# --- Evaluation of lesions, intervals and specificity ----------------------------------------------
def test_invented_lesions_count_only_large_false_clusters():
    brain = np.zeros((20, 20, 20), bool)
    brain[2:18, 2:18, 2:18] = True
    truth = np.full(brain.shape, 40.0)
    pred = truth.copy()
    pred[4:7, 4:7, 4:7] = 60.0  # a 27-voxel invented lesion
    pred[12, 12, 12:14] = 60.0  # 2 voxels: noise, not a lesion
    truth[10:13, 3:6, 3:6] = 70.0  # a true lesion, found: not invented
    pred[10:13, 3:6, 3:6] = 70.0
    out = evaluate.invented_lesions(pred, truth, brain, np.ones(brain.shape))
    assert out["invented_clusters"] == 1
    assert out["invented_fraction"] == pytest.approx(27 / brain.sum())


def test_interval_metrics_and_contrast_recovered():
    truth = np.array([40.0, 45.0, 50.0, 70.0])
    pred = {"OEF_p05": np.array([35.0, 46.0, 45.0, 60.0]), "OEF_p95": np.array([45.0, 50.0, 55.0, 80.0])}
    out = evaluate.interval_metrics(pred, truth, np.ones(4, bool), np.array([False, False, False, True]))
    assert out["coverage_OEF"] == 0.75 and out["width_OEF"] == 11.0 and out["coverage_OEF_lesions"] == 1.0
    labels = np.array([1] * 5 + [3] * 5)
    true_oef = np.array([70.0] * 5 + [40.0] * 5)
    row = evaluate.lesion_contrast(np.array([49.0] * 5 + [40.0] * 5), true_oef, labels)[0]
    assert row["recovered"] == pytest.approx(0.3)


def test_evaluate_reports_every_new_column_on_a_stroke_cohort(tmp_path, tiny_dataset):
    from OEFPredictorLib import simulate

    data = tmp_path / "stroke"
    simulate.simulate_dataset(data, n_patients=2, seed=77, voxel_size=4.0, cohort="stroke",
                              noise=simulate.NoiseModel(100.0, 2.0))
    assert [p.name for p in simulate.list_patients(data, "test")] == ["P01", "P02"]
    ctx = evaluate.MethodContext(data, models={"unet": str(tiny_spatial_model_path(str(tiny_dataset)))})
    ev = evaluate.evaluate(data, ["unet", "constant", "prior_mean"], ctx)
    summary = {r["method"]: r for r in ev.summary()}
    assert 0 <= summary["unet"]["coverage_OEF"] <= 1 and summary["unet"]["width_OEF"] > 0
    assert "coverage_OEF" not in summary["constant"]
    kinds = {(r["method"], r["lesion"]) for r in ev.lesion_summary()}
    assert ("unet", "misery_perfusion") in kinds or ("unet", "infarct_core") in kinds
    constant = [r for r in ev.lesions if r["method"] == "constant"]
    assert all(abs(r["pred_contrast_pp"]) < 1e-9 for r in constant)  # a constant shows no lesion
    text = evaluate.markdown(ev)
    assert "penumbra recovered" in text and "interval coverage" in text
    files = evaluate.write_reports(ev, tmp_path / "report")
    assert json.loads((tmp_path / "report" / "evaluation.json").read_text())["lesion_summary"]
    assert any(f.name == "lesion_summary.csv" for f in files)


def test_interval_factors_grow_with_the_volumes_noise_level():
    """Mondrian factors relative to a noise scale: 10^(intercept + slope x level (+ resampling terms)) multiplies
    every bin's factor; without the volume's noise level such factors are refused rather than guessed."""
    scale = {"width_edges_pp": [5.0], "abnormality_edges_pp": [5.0, 10.0], "noise": {"intercept": 1.0, "slope": 0.5},
             "factors": [[1.0, 1.1], [1.2, 1.3], [1.4, 1.5]]}
    half = np.array([2.0, 8.0, 2.0])
    oef = np.array([40.0, 40.0, 60.0])  # median 40: the third voxel is lesion-like
    np.testing.assert_allclose(spatial.interval_factors(scale, half, half, oef, -2.0), [1.0, 1.1, 1.4], rtol=1e-6)
    np.testing.assert_allclose(spatial.interval_factors(scale, half, half, oef, -1.0), np.sqrt(10) * np.array([1.0, 1.1, 1.4]),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="noise level"):
        spatial.interval_factors(scale, half, half, oef)
    # a decay resampled from another echo train steps the scale up by 10^resampled; without the entry
    # (cards calibrated before it) resampling changes nothing
    stepped = dict(scale, noise=dict(scale["noise"], resampled=0.25))
    resampled = decay.Resampling(resampled=True)
    np.testing.assert_allclose(spatial.interval_factors(stepped, half, half, oef, -2.0, resampled),
                               10 ** 0.25 * np.array([1.0, 1.1, 1.4]), rtol=1e-6)
    np.testing.assert_allclose(spatial.interval_factors(stepped, half, half, oef, -2.0), [1.0, 1.1, 1.4], rtol=1e-6)
    np.testing.assert_allclose(spatial.interval_factors(scale, half, half, oef, -2.0, resampled),
                               [1.0, 1.1, 1.4], rtol=1e-6)
    # continued beyond its echoes (a late first echo) and across gaps wider than the model's, it widens by
    # 10^(extrapolated_per_ms x ms + wider_gap_per_ms x ms)
    terms = dict(scale, noise=dict(scale["noise"], resampled=0.25, extrapolated_per_ms=0.05, wider_gap_per_ms=0.02))
    np.testing.assert_allclose(spatial.interval_factors(terms, half, half, oef, -2.0, decay.Resampling(True, 3.0, 5.0)),
                               10 ** 0.5 * np.array([1.0, 1.1, 1.4]), rtol=1e-6)


def test_how_a_decay_was_resampled_is_measured_in_3t_equivalent_time():
    """decay.Resampling.between: nothing for the model's own protocol; a 3 T train from 8 ms is continued 3.5 ms
    back to 4.5 ms; 6 echoes 6.5 ms apart at 3.6 T have gaps of 7.86 ms (3 T-equivalent), 2.86 ms wider than
    the paper protocol's 5 ms."""
    paper = physics.Protocol.default()
    assert decay.Resampling.between(paper, paper) == decay.Resampling()
    late = decay.Resampling.between(physics.Protocol.from_milliseconds([8.0 + 4.5 * i for i in range(8)]), paper)
    assert late.resampled and late.extrapolated_ms == pytest.approx(3.5) and late.wider_gap_ms == 0.0
    sparse = decay.Resampling.between(physics.Protocol.from_milliseconds([3.5 + 6.55 * i for i in range(6)], 3.6), paper)
    assert sparse.wider_gap_ms == pytest.approx(6.55 * 1.2 - 5.0) and sparse.extrapolated_ms == 0.0


def test_the_volume_scale_is_fitted_to_noise_and_resampling():
    """calibration.volume_scale_fit recovers log10 factor = a + b x noise level + c x resampled + d x extrapolated
    ms + e x wider-gap ms from volumes whose scores need exactly that factor; a term with too few volumes on either
    side is left out (a card without it behaves as before)."""
    from OEFPredictorLib.training import calibration

    base = np.linspace(0.0, 1.0, 2001)
    base /= calibration.conformal_factor(base)  # scores whose 90 % conformal factor is exactly 1
    rng = np.random.default_rng(0)
    n = 40
    levels = rng.uniform(-2.4, -1.2, n)
    resamplings = [decay.Resampling(True, rng.uniform(0.2, 4.0) if i % 4 == 1 else 0.0,
                                    rng.uniform(0.5, 8.0) if i % 4 == 2 else 0.0) if i % 4 else None for i in range(n)]
    middle = 0.5 * (levels.min() + levels.max())
    log_factor = [0.3 + 0.15 * level - 0.2 * (level - middle) ** 2
                  + (0.05 + 0.03 * r.extrapolated_ms + 0.01 * r.wider_gap_ms if r else 0.0)
                  for level, r in zip(levels, resamplings)]
    scores = [base * 10 ** f for f in log_factor]
    fit, table = calibration.volume_scale_fit(levels, resamplings, scores)
    assert fit.pop("noise_levels") == pytest.approx([levels.min(), levels.max()], abs=1e-3)
    assert fit == pytest.approx({"intercept": 0.3, "slope": 0.15, "curvature": -0.2, "resampled": 0.05,
                                 "extrapolated_per_ms": 0.03, "wider_gap_per_ms": 0.01}, abs=2e-3)
    assert table.shape == (n, 5)
    fit["noise_levels"] = [levels.min(), levels.max()]
    for level, r, f in zip(levels, resamplings, log_factor):  # the engine's scale is the fitted one
        assert np.log10(spatial.noise_scale({"noise": fit}, level, r)) == pytest.approx(f, abs=5e-3)
    beyond = spatial.noise_scale({"noise": fit}, levels.max() + 1.0)  # the parabola is held at its range's end
    edge = spatial.noise_scale({"noise": fit}, levels.max())
    assert np.log10(beyond / edge) == pytest.approx(0.15, abs=1e-3)
    few = [decay.Resampling(True, 1.0 if i < 3 else 0.0) for i in range(n)]  # only 3 continued beyond their echoes
    fit, _ = calibration.volume_scale_fit(levels, few, scores)
    assert "extrapolated_per_ms" not in fit and "resampled" not in fit  # every volume resampled: no step either


def test_the_noise_level_follows_the_snr_not_the_anatomy():
    """decay.noise_level, which the interval's noise bins read: about log10(5) higher at SNR 40 than at 200,
    and noise-free data far below both."""
    from OEFPredictorLib import decay, phantom, physics, simulate

    patient = phantom.make_patient(np.random.SeedSequence([5, 1]), phantom.PatientConfig.stroke(4.0))
    levels = {}
    for snr in (None, 200.0, 40.0):
        echoes, _, _ = simulate.synthesize(patient.params, patient.mask, physics.Protocol.default(),
                                           simulate.NoiseModel(snr, 2.0), np.random.default_rng(0))
        levels[snr] = decay.noise_level(echoes[patient.mask], physics.Protocol.default())
    assert 0.5 < levels[40.0] - levels[200.0] < 0.9
    assert levels[None] < levels[200.0] - 0.3
