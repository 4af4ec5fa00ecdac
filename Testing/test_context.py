"""The context model (the default spatial method): its Gaussian pyramid, its network, its training
and its place in the engine (real Keras, real SimpleITK files, tiny volumes)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from OEFPredictorLib import maptable, methods, models, physics, predict, spatial
from OEFPredictorLib.training import calibration, data, recalibrate
from OEFPredictorLib.training import context as train_context
from OEFPredictorLib.errors import InputError

TINY = train_context.ContextTrainConfig(
    patients=2, validation_patients=1, calibration_patients=1, pool_draws=3, voxels_per_draw=400, patients_per_epoch=1,
    voxels_per_epoch=800,
    batch_size=100, epochs=1, time_limit_min=None, voxel_size_mm=4.0, dense=(8, 8))


def _volume(shape=(14, 16, 12), seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    mask[2:-2, 3:-3, 2:-2] = True
    decay = np.exp(-np.arange(8) * 0.1)
    echoes = (rng.uniform(0.8, 1.2, shape)[..., None] * decay).astype(np.float32)
    qsm = rng.normal(0, 0.02, shape).astype(np.float32)
    return spatial.volume_features(echoes * mask[..., None], qsm * mask, mask, 10.0), mask


def _ratios(features):
    """The first context model's base channels: log(S_j / S_1), j = 2..8, and QSM."""
    return spatial.base_channels(features, {})


def test_the_pyramid_holds_log_echo_ratios_and_mask_normalised_averages():
    features, mask = _volume()
    x = spatial.context_features(_ratios(features), mask, [1.0, 2.0])
    assert x.shape == mask.shape + (8 * 3,) and np.all(x[~mask] == 0)
    # base channels: log(S_j / S_1) = -0.1 (j - 1) here, and QSM x 10
    np.testing.assert_allclose(x[mask][:, :7], np.broadcast_to(-0.1 * np.arange(1, 8), (mask.sum(), 7)), atol=1e-5)
    np.testing.assert_allclose(x[..., 7][mask], features[..., 8][mask], atol=1e-6)
    # uniform channels stay uniform up to the brain's edge: the background is not averaged in
    np.testing.assert_allclose(x[mask][:, 8:15], x[mask][:, :7], atol=1e-5)
    np.testing.assert_allclose(x[mask][:, 16:23], x[mask][:, :7], atol=1e-5)
    # a noisy QSM channel is smoothed: less spread at the larger scale
    assert x[..., 23][mask].std() < x[..., 15][mask].std() < x[..., 7][mask].std()


def test_the_pyramid_does_not_depend_on_how_much_background_surrounds_the_brain():
    features, mask = _volume()
    padded = np.pad(features, [(5, 3), (0, 4), (2, 2), (0, 0)])
    padded_mask = np.pad(mask, [(5, 3), (0, 4), (2, 2)])
    a = spatial.context_features(_ratios(features), mask, [1.5, 3.0])
    b = spatial.context_features(_ratios(padded), padded_mask, [1.5, 3.0])[5:-3, :-4, 2:-2]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_local_noise_channels_follow_the_noise_level():
    """Noisier data -> larger local-noise channels, so the network can tell noise from a lesion."""
    rng = np.random.default_rng(3)
    shape = (16, 16, 16)
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    decay = np.exp(-np.arange(8) * 0.08)
    levels = []
    for sigma in (0.005, 0.02):
        echoes = np.abs(decay + sigma * rng.standard_normal(shape + (8,))).astype(np.float32) * mask[..., None]
        qsm = (sigma * rng.standard_normal(shape)).astype(np.float32) * mask
        x = spatial.context_features(_ratios(spatial.volume_features(echoes, qsm, mask, 10.0)), mask, [1.0, 2.0],
                                     local_noise=True)
        assert x.shape[-1] == 8 * 3 + len(spatial.LOCAL_NOISE_CHANNELS)
        levels.append(x[..., -2:][mask].mean(axis=0))
    # 4x the noise: log RMS larger by about log 4 = 1.4 in both channels
    assert np.all(levels[1] - levels[0] > 1.0)
    without = spatial.context_features(_ratios(spatial.volume_features(echoes, qsm, mask, 10.0)), mask, [1.0, 2.0])
    np.testing.assert_array_equal(without, x[..., :24])


def test_the_network_works_voxel_by_voxel_on_any_volume_and_loads_in_safe_mode(tmp_path):
    import keras

    spec = dict(models.CONTEXT_NET, dense=[8, 4])
    n = spatial.context_feature_count(spec)
    model = models.build_context_net(spec, n, spatial.N_OUTPUTS, np.full(n, 0.5), np.full(n, 2.0))
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(1, 5, 7, 3, n)).astype(np.float32)
    out = model.predict_on_batch(volume)
    assert out.shape == (1, 5, 7, 3, spatial.N_OUTPUTS)
    # one voxel alone gives the same output as inside the volume (1x1x1: the pyramid is the context)
    alone = model.predict_on_batch(volume[:, 2:3, 4:5, 1:2])
    np.testing.assert_allclose(alone[0, 0, 0, 0], out[0, 2, 4, 1], atol=1e-5)
    model.save(tmp_path / "c.keras")
    again = keras.saving.load_model(tmp_path / "c.keras", compile=False, safe_mode=True)
    np.testing.assert_allclose(again.predict_on_batch(volume), out, atol=1e-6)
    # the stored feature scaling is part of the file
    shifted = models.build_context_net(spec, n, spatial.N_OUTPUTS)
    shifted.set_weights(model.get_weights())
    assert not np.allclose(shifted.predict_on_batch(volume), out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("context") / "c.keras"
    return out, train_context.train(out, TINY, verbose=0)


def test_training_writes_a_calibrated_bundle_with_its_lesion_log_and_resumes(trained):
    out, card = trained
    assert card["model"]["architecture"] == "context" and card["model"]["sigmas_mm"] == [2.0, 4.0, 8.0]
    assert card["model"]["local_noise"] and card["training"]["snr_range"] == [18.0, 250.0]
    factors = np.asarray(card["spatial"]["interval_scale"]["factors"])
    assert factors.shape == (len(calibration.ABNORMALITY_EDGES_PP) + 1, calibration.WIDTH_BINS) and np.all(factors > 0)
    assert card["spatial"]["calibration"]["priors"].startswith("population")
    assert card["supported_protocols"]["field_strength_T"] == [1.5, 7.0]
    assert card["training"]["lesion_weight"] == 3.0 and card["training"]["epochs_run"] == 1
    history = out.with_name("c.history.csv").read_text().splitlines()
    assert "val_penumbra" in history[0] and "val_core" in history[0] and len(history) == 2
    bundle = models.load_bundle(out)  # checksum + safe mode
    assert methods.of_card(bundle.card).name == "context"
    resumed = train_context.train(out, dataclasses.replace(TINY, epochs=2), resume=True, verbose=0)
    assert resumed["training"]["epochs_run"] == 2
    with pytest.raises(InputError, match="options differ"):
        train_context.train(out, dataclasses.replace(TINY, epochs=3, lesion_weight=2.0), resume=True, verbose=0)


def test_a_second_stage_starts_from_an_earlier_network_and_keeps_its_scaling(trained, tmp_path):
    """--init-from: the run starts from the earlier network's weights (at a vanishing learning rate the weights
    stay the earlier ones; a fresh network differs), keeps its output scaling, and the card names its file and
    checksum. A network of another architecture or other echo times is refused in one line."""
    first, first_card = trained
    stage = dataclasses.replace(TINY, init_from=str(first), learning_rate=1e-12)
    card = train_context.train(tmp_path / "s.keras", stage, verbose=0)
    assert card["training"]["init_from"] == str(first)
    assert card["training"]["init_from_sha256"] == models.sha256_of(first)
    assert card["output_scaling"] == first_card["output_scaling"]
    before, after = models.load_bundle(first).model, models.load_bundle(tmp_path / "s.keras").model
    for a, b in zip(before.get_weights(), after.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    bound = dataclasses.replace(TINY, init_from=str(first), echo_times_ms=(4.5, 9.5, 14.5, 19.5))
    with pytest.raises(InputError, match="--init-from .*not a spatial model with this architecture"):
        train_context.train(tmp_path / "b.keras", bound, verbose=0)


def test_lesion_voxels_weigh_more_in_the_loss():
    for index in range(8):  # the first training patient with a lesion at 4 mm
        patient = data.make_patient(data.TRAIN_SEED, index, TINY)
        lesion = np.isin(patient.lesion_map, (1, 2)) & patient.metric
        if lesion.any():
            break
    assert lesion.any() and (~lesion & patient.metric).any()
    x, t = train_context.pyramid(patient, np.random.default_rng(0), TINY)
    where = np.flatnonzero(patient.metric)
    scaling = train_context.fit_scaling([patient])
    _, y = train_context.voxel_rows(x, t, patient, where, scaling, lesion_weight=4.0)
    weights = y[:, 0, 0, 0, -1]
    np.testing.assert_array_equal(weights, np.where(lesion.reshape(-1)[where], 4.0, 1.0))


def test_the_engine_runs_the_context_model_with_its_interval(trained, tiny_dataset):
    from OEFPredictorLib import simulate

    out, _ = trained
    data = simulate.load_patient(tiny_dataset / "P01")
    inputs = predict.PredictionInputs(data.echoes, data.qsm, data.protocol, data.mask, spacing=data.geometry.spacing)
    spec, _ = predict.resolve_method(None, str(out))
    assert spec.name == "context"
    result = predict.predict_maps(inputs, model=str(out), device="cpu")
    m = result.mask
    assert result.method == "context" and set(maptable.INTERVAL) <= set(result.maps)
    assert np.all(result.maps["OEF_p05"][m] <= result.maps["OEF"][m] + 1e-4)
    assert np.all(result.maps["OEF"][m] <= result.maps["OEF_p95"][m] + 1e-4)
    assert np.all(result.maps["OEF"][~m] == 0) and np.isfinite(result.maps["OEF"][m]).all()


def test_the_command_line_refuses_u_net_options_for_the_context_model(tmp_path, capsys):
    from OEFPredictorLib.cli import main

    rc = main(["train", "--arch", "context", "--out", str(tmp_path / "c.keras"), "--lesion-patch-share", "0.5"])
    assert rc == 2 and "--lesion-patch-share is an option of --arch unet" in capsys.readouterr().err
    assert not Path(tmp_path / "c.keras").exists()


def test_a_context_recipe_is_one_command(tmp_path, monkeypatch, capsys):
    """Every setting of a context recipe is a command-line option, and each reaches the trainer's config
    (the trainer is replaced by one that records the config and writes nothing: this test is about the
    mapping; the trainer itself is tested above). A bad value is refused in one line before any work."""
    from OEFPredictorLib.cli import main

    seen = []

    def recording_train(out, config, **kwargs):
        seen.append(config)
        raise InputError("recorded")

    monkeypatch.setattr(train_context, "train", recording_train)
    rc = main(["train", "--arch", "context", "--out", str(tmp_path / "c.keras"), "--echo-times", "4.5,9.5,14.5,19.5",
               "--own-protocol-share", "1", "--snr-range", "25,250", "--lesion-free-share", "0.15", "--lesion-weight", "4",
               "--qsm-offset-ppm", "0", "--learning-rate", "1e-3", "--pool-draws", "12", "--voxels-per-draw", "40000",
               "--draws-per-epoch", "12", "--voxels-per-epoch", "480000", "--init-from", "first.keras"])
    assert rc == 2 and len(seen) == 1
    config = seen[0]
    assert (config.paper_protocol_share, config.snr_range, config.lesion_free_share, config.qsm_offset_ppm) == (
        1.0, (25.0, 250.0), 0.15, 0.0)
    assert (config.lesion_weight, config.learning_rate, config.pool_draws, config.voxels_per_draw,
            config.patients_per_epoch, config.voxels_per_epoch) == (4.0, 1e-3, 12, 40000, 12, 480000)
    assert config.echo_times_ms == (4.5, 9.5, 14.5, 19.5) and config.init_from == "first.keras"
    assert config.wide_prior_share == train_context.ContextTrainConfig().wide_prior_share  # not given: the default
    capsys.readouterr()
    for bad in (["--snr-range", "25"], ["--snr-range", "250,25"], ["--lesion-free-share", "1.5"]):
        assert main(["train", "--arch", "context", "--out", str(tmp_path / "c.keras")] + bad) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert len(seen) == 1


def test_the_engine_runs_any_supported_protocol_and_refuses_others_in_one_line(trained, tmp_path):
    """A 7 T, 10-echo acquisition runs (R2 comes back in real time); 20 echoes are refused by name."""
    from OEFPredictorLib import physics, simulate

    out, _ = trained
    seven = physics.Protocol.from_milliseconds([2.5 + 2.1 * i for i in range(10)], 7.0)
    folder = simulate.simulate_dataset(tmp_path / "d7", 1, seed=5, protocol=seven, voxel_size=4.0,
                                       noise=simulate.NoiseModel(100.0, 2.0), r2_field_exponent=0.75)[0]
    data = simulate.load_patient(folder)
    assert data.protocol.matches(seven)
    inputs = predict.PredictionInputs(data.echoes, data.qsm, data.protocol, data.mask, spacing=data.geometry.spacing)
    result = predict.predict_maps(inputs, model=str(out), device="cpu")
    m = result.mask
    assert np.isfinite(result.maps["OEF"][m]).all() and np.all(result.maps["R2"][m] >= physics.BOUNDS["R2"][0])
    twenty = physics.Protocol.from_milliseconds([2.0 + 2.0 * i for i in range(20)], 3.0)
    echoes = data.echoes[..., :1] * np.exp(-0.03 * np.arange(20, dtype=np.float32))
    with pytest.raises(InputError, match=r"20 echoes.*--method cat"):
        predict.predict_maps(predict.PredictionInputs(echoes, data.qsm, twenty, data.mask), model=str(out), device="cpu")


@pytest.mark.parametrize("field_t", [3.0, 1.5])
def test_the_bundled_models_read_qsm_from_csf_so_an_offset_does_not_move_the_map(tiny_dataset, tmp_path, field_t):
    """Another QSM pipeline's reference (a constant offset) gives the same map, from the paper-protocol network
    (3 T) and from the 4.5-22 ms network (1.5 T, 8 echoes 5/7 ms); before, +-0.05 ppm moved the OEF RMSE from
    3.6 to 6-7 pp (benchmarks/results/shift_suite_previous_model.json), and the 4.5-22 ms network's card did
    not say that it was trained on CSF-referenced QSM, so the engine gave it absolute QSM."""
    from OEFPredictorLib import simulate

    if field_t == 3.0:
        data = simulate.load_patient(tiny_dataset / "P02")
    else:
        protocol = physics.Protocol.from_milliseconds([5.0 + 7.0 * i for i in range(8)], field_t)
        folder = simulate.simulate_dataset(tmp_path, 1, seed=12, protocol=protocol, voxel_size=4.0,
                                           noise=simulate.NoiseModel(100.0, 2.0))[0]
        data = simulate.load_patient(folder)
    maps = []
    for offset in (0.0, 0.05, -0.05):
        qsm = np.where(data.mask, data.qsm + np.float32(offset), 0.0).astype(np.float32)
        inputs = predict.PredictionInputs(data.echoes, qsm, data.protocol, data.mask, spacing=data.geometry.spacing)
        result = predict.predict_maps(inputs, method="context", device="cpu")
        assert result.model_card["file"] == ("oef_context.keras" if field_t == 3.0 else "oef_context_short.keras")
        maps.append(result.maps["OEF"])
    np.testing.assert_allclose(maps[1], maps[0], atol=0.02)
    np.testing.assert_allclose(maps[2], maps[0], atol=0.02)
    assert np.ptp(maps[0][data.mask]) > 1.0  # a map, not a constant


TWELVE_ECHOES_MS = [3.5 + 4.1 * i for i in range(12)]


def _paper_and_twelve_echo_maps(folder: Path, seed: int, repeat: int = 1, spacing_mm=None):
    """The default model's maps of one noise-free 4 mm patient acquired with the paper's 8 echoes and with
    12 (3.5-48.6 ms), each voxel repeated into repeat^3 voxels of `spacing_mm` (None: the data's own).
    Returns (maps at the paper protocol, maps with 12 echoes, the mask)."""
    from OEFPredictorLib import simulate

    def blocks(a):
        for axis in range(3):
            a = np.repeat(a, repeat, axis=axis)
        return a

    maps = []
    twelve = physics.Protocol.from_milliseconds(TWELVE_ECHOES_MS, 3.0)
    for name, protocol in (("paper", physics.Protocol.default()), ("twelve", twelve)):
        patient = simulate.simulate_dataset(folder / name, 1, seed=seed, protocol=protocol, voxel_size=4.0,
                                            noise=simulate.NoiseModel(snr=None, qsm_noise_ppb=0.0))[0]
        data = simulate.load_patient(patient)
        spacing = data.geometry.spacing if spacing_mm is None else (spacing_mm,) * 3
        inputs = predict.PredictionInputs(blocks(data.echoes), blocks(data.qsm), data.protocol, blocks(data.mask),
                                          spacing=spacing)
        maps.append(predict.predict_maps(inputs, method="context", device="cpu").maps)
    return maps[0], maps[1], blocks(data.mask)


def test_the_bundled_model_maps_another_3t_echo_train_as_its_own(tiny_dataset, tmp_path):
    """The same noise-free patient acquired with 12 echoes (3.5-48.6 ms) instead of the paper's 8: the engine
    resamples the decay to the model's echo times, and the OEF map stays within 1 pp (RMS) of the map from
    the paper's protocol. R2 comes back in real time."""
    paper, twelve, mask = _paper_and_twelve_echo_maps(tmp_path, seed=23)
    oef_difference = twelve["OEF"][mask] - paper["OEF"][mask]
    assert np.sqrt(np.mean(oef_difference ** 2)) < 1.0
    assert np.abs(np.median(twelve["R2"][mask] - paper["R2"][mask])) < 0.5


def test_another_echo_train_at_1_mm_is_resampled_on_the_model_grid(tmp_path):
    """At 1 mm the decay of another echo train is resampled after averaging to the 2 mm model grid (8x
    fewer voxels than voxel by voxel). The same noise-free patient acquired with 12 echoes and with the
    paper's 8, each voxel repeated into a 2x2x2 block of 1 mm voxels: the two OEF maps agree within 1 pp
    RMS, and S0 (scaled by the model's first echo, which the 12-echo train does not have) within 1 %."""
    paper, twelve, mask = _paper_and_twelve_echo_maps(tmp_path, seed=31, repeat=2, spacing_mm=1.0)
    assert np.sqrt(np.mean((twelve["OEF"][mask] - paper["OEF"][mask]) ** 2)) < 1.0
    assert abs(np.median(twelve["S0"][mask] / paper["S0"][mask]) - 1.0) < 0.01
    assert np.ptp(paper["OEF"][mask]) > 1.0


@pytest.mark.parametrize("spacing_mm", [2.0, 1.0, 1.3])
def test_the_context_network_runs_only_on_the_voxels_it_is_read_at_and_gives_the_tiled_maps(
        tmp_path, monkeypatch, spacing_mm):
    """The context model's network maps each voxel's features alone, so the engine runs it in fixed-size
    chunks on the model-grid voxels that the way back to the data grid reads (the grid mask and each data
    voxel's nearest model voxel), not on tiles of the brain's box. At the data's own grid (2 mm), on whole
    blocks (1 mm) and on a non-integer ratio (1.3 mm), the maps equal those of the tiled run; every call
    has one shape; and a strand of brain one voxel thick, away from the brain (under half of each model voxel,
    so read at its nearest model voxel), gets the same values as where the network runs everywhere."""
    from OEFPredictorLib import simulate

    patient = simulate.simulate_dataset(tmp_path, 1, seed=41, voxel_size=4.0,
                                        noise=simulate.NoiseModel(snr=None, qsm_noise_ppb=0.0))[0]
    data = simulate.load_patient(patient)
    repeat = 2 if spacing_mm < 2.0 else 1
    echoes, qsm, mask = (np.repeat(np.repeat(np.repeat(a, repeat, 0), repeat, 1), repeat, 2)
                         for a in (data.echoes, data.qsm, data.mask))
    # a strand of brain one data voxel thick, beyond the brain's box along x
    echoes, qsm, mask = (np.pad(a, [(0, 0), (0, 0), (0, 10)] + [(0, 0)] * (a.ndim - 3)) for a in (echoes, qsm, mask))
    centre = tuple(int(c) for c in np.argwhere(mask).mean(axis=0))
    echoes[:, centre[1], -1], qsm[:, centre[1], -1] = echoes[centre], qsm[centre]
    mask[:, centre[1], -1] = True
    inputs = predict.PredictionInputs(echoes, qsm, data.protocol, mask, spacing=(spacing_mm,) * 3)
    calls = []
    real = spatial.run_pointwise

    def recording(predict_fn, features, where, **kwargs):
        return real(lambda batch: calls.append(batch.shape) or predict_fn(batch), features, where, **kwargs)

    monkeypatch.setattr(spatial, "run_pointwise", recording)
    chunked = predict.predict_maps(inputs, method="context", device="cpu").maps
    assert len(set(calls)) == 1 and calls[0][:4] == (1, spatial.POINTWISE_CHUNK, 1, 1)
    monkeypatch.setattr(spatial, "run_pointwise",
                        lambda predict_fn, features, where, **kwargs: spatial.run_network(
                            predict_fn, features, np.ones_like(where), 1, **kwargs))  # the network everywhere
    tiled = predict.predict_maps(inputs, method="context", device="cpu").maps
    for name in ("OEF", "S0", "R2", "OEF_p05", "OEF_p95"):
        np.testing.assert_allclose(chunked[name][mask], tiled[name][mask], rtol=1e-4, atol=1e-3)


def test_a_network_bound_to_echo_times_trains_on_draws_resampled_to_them(tmp_path):
    """--echo-times binds the network to a 3 T echo train (as the bundled models are): its card gives those
    echo times and a span and says its QSM is read relative to CSF (as its training inputs were), its inputs
    are their echo ratios, and the engine resamples a 1.5 T train to it."""
    from OEFPredictorLib import simulate

    window = (8.0, 10.0, 12.0, 14.0, 16.0, 18.0)
    config = dataclasses.replace(TINY, echo_times_ms=window, paper_protocol_share=0.0)
    patient = data.make_patient(data.TRAIN_SEED, 0, config)
    x, t = train_context.pyramid(patient, np.random.default_rng(1), config,
                                 protocol=physics.Protocol.from_milliseconds([5.0 + 7.0 * i for i in range(8)], 1.5))
    assert x.shape[-1] == (len(window) - 1 + 1) * 4 + len(spatial.LOCAL_NOISE_CHANNELS)  # ratios + QSM, 3 sigmas + 1
    out = tmp_path / "w.keras"
    card = train_context.train(out, config, verbose=0)
    assert card["protocol"]["echo_times_ms"] == list(window) and "decay" not in card["model"]
    assert card["supported_protocols"]["spans_ms"] == [8.0, 18.0] and "resampled" in card["training"]["protocols"]
    assert spatial.reads_qsm_from_csf(card)  # its inputs were made so (pyramid): the engine must do the same
    one_and_a_half = physics.Protocol.from_milliseconds([5.0 + 7.0 * i for i in range(8)], 1.5)
    folder = simulate.simulate_dataset(tmp_path / "d", 1, seed=3, protocol=one_and_a_half, voxel_size=4.0,
                                       noise=simulate.NoiseModel(100.0, 2.0))[0]
    d = simulate.load_patient(folder)
    result = predict.predict_maps(predict.PredictionInputs(d.echoes, d.qsm, d.protocol, d.mask,
                                                           spacing=d.geometry.spacing), model=str(out), device="cpu")
    assert np.isfinite(result.maps["OEF"][result.mask]).all()
    with pytest.raises(InputError, match=r"echoes covering 2.5-7.5 ms"):  # 1.5 T, up to 15 ms: short of 18 ms
        predict.Predictor.build(physics.Protocol.from_milliseconds([5.0 + 2.0 * i for i in range(6)], 1.5), model=str(out))


def test_the_bundled_context_models_are_chosen_by_the_data_s_echo_train():
    """The paper's protocol runs the paper-protocol network; a 1.5 T train (echoes 2.5-27 ms in 3 T-equivalent
    time, short of 39.5 ms) the network bound to 4.5-22 ms, with a warning; a 3 T train starting at 6 ms the
    paper-protocol network, with a warning that the decay is continued back to 4.5 ms; a 3 T train ending at
    18 ms the short one, continued to 22 ms. Echoes that start or stop beyond what either reads (7 T from 4 ms:
    9.33 ms in 3 T-equivalent time; 3 T ending at 16 ms) are refused in one line that says where the echoes
    must start and end for each model, and the method that runs."""
    paper = predict.Predictor.build(physics.Protocol.default())
    assert paper.bundle.path.name == "oef_context.keras" and paper.caveats() == []
    one_and_a_half = predict.Predictor.build(physics.Protocol.from_milliseconds([5.0 + 7.0 * i for i in range(8)], 1.5))
    assert one_and_a_half.bundle.path.name == "oef_context_short.keras"
    assert "comes from oef_context_short.keras, which reads only 4.5-22 ms" in one_and_a_half.caveats()[0]
    late = predict.Predictor.build(physics.Protocol.from_milliseconds([6.0 + 5.0 * i for i in range(8)], 3.0))
    assert late.bundle.path.name == "oef_context.keras"
    assert ["the first echo comes at 6 ms, after the model's first echo time (4.5 ms)" in c for c in late.caveats()] == [True]
    short = predict.Predictor.build(physics.Protocol.from_milliseconds([3.0 + 3.0 * i for i in range(6)], 3.0))
    assert short.bundle.path.name == "oef_context_short.keras" and len(short.caveats()) == 2
    assert "the last echo comes at 18 ms, before the model's last echo time (22 ms)" in short.caveats()[1]
    reads = (r"starting by 8.5 ms and reaching 39 ms, at most 9 ms apart less any ms continued before the first or after "
             r"the last \(oef_context.keras\) or starting by 8.5 ms and reaching 18 ms \(oef_context_short.keras\)")
    for te_ms, b0, covering in (([4.0 + 1.9 * i for i in range(10)], 7.0, "9.33-49.2"),
                                ([3.0 + 3.25 * i for i in range(5)], 3.0, "3-16")):
        with pytest.raises(InputError, match=reads + rf".*covering {covering} ms.*--method cat"):
            predict.Predictor.build(physics.Protocol.from_milliseconds(te_ms, b0))


def test_a_1_5_t_acquisition_is_mapped_by_the_short_span_network_with_a_warning(tmp_path):
    """The engine's own call on a 1.5 T patient (8 echoes 5-54 ms, echoes to 27 ms in 3 T-equivalent time):
    the 4.5-22 ms network makes the maps, the result names it, and the warning says what it reads."""
    from OEFPredictorLib import simulate

    protocol = physics.Protocol.from_milliseconds([5.0 + 7.0 * i for i in range(8)], 1.5)
    folder = simulate.simulate_dataset(tmp_path / "d", 1, seed=11, protocol=protocol, voxel_size=4.0,
                                       noise=simulate.NoiseModel(100.0, 2.0), r2_field_exponent=0.75)[0]
    d = simulate.load_patient(folder)
    result = predict.predict_maps(predict.PredictionInputs(d.echoes, d.qsm, d.protocol, d.mask,
                                                           spacing=d.geometry.spacing), method="context", device="cpu")
    assert result.model_card["file"] == "oef_context_short.keras"
    assert any("comes from oef_context_short.keras" in w and "lesions may not show" in w for w in result.warnings)
    oef = result.maps["OEF"][result.mask]
    assert np.isfinite(oef).all() and 10.0 < np.median(oef) < 70.0


def test_a_late_first_echo_is_mapped_by_the_paper_protocol_network_with_a_warning(tmp_path):
    """The engine's own call on a 3 T patient whose first echo comes at 8 ms (3.5 ms after the network's): the
    paper-protocol network makes the maps, the warning says that the decay was continued back to 4.5 ms, and the
    interval is wider than for the same patient at the network's own protocol."""
    from OEFPredictorLib import simulate

    widths = {}
    for name, protocol in (("own", physics.Protocol.default()),
                           ("late", physics.Protocol.from_milliseconds([8.0 + 4.5 * i for i in range(8)], 3.0))):
        folder = simulate.simulate_dataset(tmp_path / name, 1, seed=12, protocol=protocol, voxel_size=4.0,
                                           noise=simulate.NoiseModel(100.0, 2.0))[0]
        d = simulate.load_patient(folder)
        result = predict.predict_maps(predict.PredictionInputs(d.echoes, d.qsm, d.protocol, d.mask,
                                                               spacing=d.geometry.spacing), method="context",
                                      device="cpu")
        assert result.model_card["file"] == "oef_context.keras"
        continued = [w for w in result.warnings if "the first echo comes at 8 ms" in w]
        assert len(continued) == (name == "late") and all("continued" in w for w in continued)
        oef = result.maps["OEF"][result.mask]
        assert np.isfinite(oef).all() and 10.0 < np.median(oef) < 70.0
        widths[name] = float(np.median((result.maps["OEF_p95"] - result.maps["OEF_p05"])[result.mask]))
    assert widths["late"] > widths["own"]


def test_a_fallback_model_is_calibrated_only_on_echo_trains_that_reach_it():
    """The 4.5-22 ms model never sees data that the paper-protocol model reads (the engine runs that one
    first), so its calibration draws none of them; the preferred model draws any it reads."""
    from OEFPredictorLib import resources

    short = models.load_bundle(resources.resource_path("Models", "oef_context_short.keras"))
    taken = calibration.preferred_ranges(short)
    assert [r.spans_ms for r in taken] == [(4.5, 39.5)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        protocol = calibration.draw_acquisition(rng, short.protocol_range, taken=taken)
        assert not short.protocol_range.problems(protocol) and all(r.problems(protocol) for r in taken)
    assert calibration.preferred_ranges(models.load_bundle(None)) == []


def test_recalibration_covers_90_percent_of_its_calibration_voxels_and_replaces_the_card_whole(trained, tmp_path):
    """The interval recalibrated through the engine's own path (other protocols resampled) covers 88-92 %
    of the calibration voxels; the command replaces the model's card atomically and leaves the model file."""
    import shutil

    out, _ = trained
    model = tmp_path / "m.keras"
    shutil.copy(out, model)
    shutil.copy(out.with_suffix(".json"), model.with_suffix(".json"))
    before = model.read_bytes()
    assert recalibrate.main([str(model), "--patients", "3"]) == 0
    card = models.load_bundle(model).card  # still loads: checksum of the unchanged model
    record = card["spatial"]["calibration"]
    assert 0.88 <= record["coverage_after"] <= 0.92 and len(record["protocols"]) == 3
    assert set(card["spatial"]["interval_scale"]["noise"]) == {"intercept", "slope"}
    assert model.read_bytes() == before and not model.with_suffix(".json.partial").exists()


def test_the_bundled_model_leans_on_the_brain_median_in_noisy_data(tmp_path):
    """The engine applies the card's contrast gain for the volume's measured noise: at SNR 25 the bundled map's
    deviations from the brain's median are the raw network's times a gain well below 1 (the map leans on the
    brain's own typical value rather than read noise as lesions), and its median stays where it was."""
    from OEFPredictorLib import simulate

    folder = simulate.simulate_dataset(tmp_path, 1, seed=31, voxel_size=4.0, noise=simulate.NoiseModel(25.0, 2.0))[0]
    d = simulate.load_patient(folder)
    bundle = models.load_bundle(None)
    raw = calibration.uncalibrated(bundle.model, bundle.card, bundle.path)
    diagnostics, warnings = {}, []
    shown = spatial.predict_volume(bundle, d.echoes, d.qsm, d.mask, d.geometry.spacing, d.protocol,
                                   diagnostics=diagnostics, warnings=warnings)["OEF"]
    network = spatial.predict_volume(raw, d.echoes, d.qsm, d.mask, d.geometry.spacing, d.protocol)["OEF"]
    gain = spatial.contrast_gain(bundle.card["spatial"]["contrast_gain"], diagnostics["noise_level"])
    assert gain < 0.8
    centre = np.median(network)
    assert np.median(shown) == pytest.approx(centre, abs=0.05)
    np.testing.assert_allclose(shown - centre, gain * (network - centre), atol=0.02)
    said = [w for w in warnings if "noisy" in w]  # the output says so, with the gain
    assert len(said) == 1 and f"scaled by {gain:.2f}" in said[0]
    quiet = []  # at SNR 100 the gain is about 1: nothing to say
    clean = simulate.simulate_dataset(tmp_path / "clean", 1, seed=31, voxel_size=4.0,
                                      noise=simulate.NoiseModel(100.0, 2.0))[0]
    c = simulate.load_patient(clean)
    spatial.predict_volume(bundle, c.echoes, c.qsm, c.mask, c.geometry.spacing, c.protocol, warnings=quiet)
    assert not [w for w in quiet if "noisy" in w]
