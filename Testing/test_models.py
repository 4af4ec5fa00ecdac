"""The networks (architecture, parameter counts) and model files (safe reload, checksum, protocol).

Real Keras models throughout; the large paper models are only built (no training) to check them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from OEFPredictorLib import models, physics, sequences
from OEFPredictorLib.errors import InputError

TINY_LSTM = {"architecture": "lstm", "cell": "lstm", "units": [8, 4], "dense": [8]}


def lstm_params(n_in: int, units: int) -> int:
    # 4 gates, each with input and recurrent kernels and a bias
    return 4 * (units * (n_in + units) + units)


def layer_summary(model):
    rows = []
    for layer in model.layers[1:]:
        width = getattr(layer, "units", None)
        rows.append((type(layer).__name__, width))
    return rows


def test_paper_lstm_matches_the_paper_architecture():
    model = models.build_model(models.PAPER_LSTM)
    assert model.input_shape == (None, 5, 9)
    assert model.output_shape == (None, 5)
    assert layer_summary(model) == [
        ("LSTM", 512), ("LSTM", 256), ("LSTM", 128), ("LSTM", 64), ("Flatten", None),
        ("Dense", 64), ("LeakyReLU", None), ("Dense", 32), ("LeakyReLU", None),
        ("Dense", 16), ("LeakyReLU", None), ("Dense", 5)]
    recurrent = [layer for layer in model.layers if type(layer).__name__ == "LSTM"]
    assert [layer.return_sequences for layer in recurrent] == [True, True, True, False]
    assert all(layer.activation.__name__ == "tanh" for layer in recurrent)
    leaky = [layer for layer in model.layers if type(layer).__name__ == "LeakyReLU"]
    assert all(abs(float(layer.negative_slope) - 0.01) < 1e-9 for layer in leaky)
    # parameter count, independently from the layer sizes
    expected = (lstm_params(9, 512) + lstm_params(512, 256) + lstm_params(256, 128) + lstm_params(128, 64)
                + (64 * 64 + 64) + (64 * 32 + 32) + (32 * 16 + 16) + (16 * 5 + 5))
    assert expected == 2_109_893
    assert model.count_params() == 2_109_893


def test_paper_dnn_is_a_voxelwise_mlp():
    model = models.build_model(models.PAPER_DNN, window_length=1)
    assert model.input_shape == (None, 1, 9)
    assert layer_summary(model) == [("Flatten", None), ("Dense", 256), ("LeakyReLU", None), ("Dense", 256),
                                    ("LeakyReLU", None), ("Dense", 128), ("LeakyReLU", None), ("Dense", 5)]
    assert model.count_params() == (9 * 256 + 256) + (256 * 256 + 256) + (256 * 128 + 128) + (128 * 5 + 5)


def test_gru_variant_builds_with_gru_cells():
    model = models.build_model(dict(models.PAPER_LSTM, cell="gru"))
    assert [type(layer).__name__ for layer in model.layers[1:5]] == ["GRU"] * 4
    assert model.output_shape == (None, 5)


def _tiny_bundle(tmp_path, protocol=None):
    model = models.build_model(TINY_LSTM)
    rng = np.random.default_rng(0)
    scaling = models.fit_output_scaling(rng.normal(size=(100, 5)))
    card = models.make_card(TINY_LSTM, protocol or physics.Protocol.default(), scaling, 5, "centre")
    path = tmp_path / "tiny.keras"
    models.save_bundle(model, card, path)
    return model, path


def test_saved_model_reloads_in_safe_mode_and_predicts_identically(tmp_path):
    model, path = _tiny_bundle(tmp_path)
    x = np.random.default_rng(1).normal(size=(64, 5, 9)).astype(np.float32)
    bundle = models.load_bundle(path)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == models.sha256_of(path)
    np.testing.assert_array_equal(bundle.model.predict(x, verbose=0), model.predict(x, verbose=0))
    assert bundle.window_length == 5 and bundle.window_target == "centre"


def test_model_for_another_protocol_is_refused_with_a_clear_message(tmp_path):
    _, path = _tiny_bundle(tmp_path)
    bundle = models.load_bundle(path)
    bundle.check_protocol(physics.Protocol.default())  # its own protocol passes
    shifted = physics.Protocol.from_milliseconds([5.0 + 5.0 * i for i in range(8)], 3.0)
    with pytest.raises(InputError, match=r"differs in its echo times from the model's"):
        bundle.check_protocol(shifted)
    with pytest.raises(InputError, match=r"6 echoes"):
        bundle.check_protocol(physics.Protocol.from_milliseconds([4.5 + 5.0 * i for i in range(6)], 3.0))
    with pytest.raises(InputError, match=r"differs in its field strength"):
        bundle.check_protocol(physics.Protocol(physics.Protocol.default().echo_times, 1.5))


def test_corrupt_or_replaced_model_file_is_refused(tmp_path):
    _, path = _tiny_bundle(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="checksum mismatch"):
        models.load_bundle(path)
    # a garbage file whose card carries its checksum: the checksum passes, Keras must refuse it
    path.write_bytes(b"not a keras archive" * 10)
    card_file = path.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card["sha256"] = models.sha256_of(path)
    card_file.write_text(json.dumps(card))
    with pytest.raises(InputError, match="not a Keras model archive"):
        models.load_bundle(path)
    card_file.unlink()
    with pytest.raises(InputError, match="card"):
        models.load_bundle(path)


def test_output_scaling_round_trip():
    rng = np.random.default_rng(2)
    params = {"S0": rng.uniform(500, 900, 50), "R2": rng.uniform(5, 30, 50), "Y": rng.uniform(0.3, 0.8, 50),
              "v": rng.uniform(0.01, 0.08, 50), "chi_nb": rng.normal(0, 0.05, 50)}
    echo1 = params["S0"] * rng.uniform(0.6, 0.9, 50)
    raw = np.stack([params["S0"] / echo1] + [params[n] for n in physics.PARAMETER_NAMES[1:]], axis=1)
    scaling = models.fit_output_scaling(raw)
    encoded = models.encode_targets(params, echo1, scaling)
    np.testing.assert_allclose(encoded.mean(axis=0), 0, atol=1e-5)
    decoded = models.decode_outputs(encoded, echo1, scaling)
    for n in physics.PARAMETER_NAMES:
        np.testing.assert_allclose(decoded[n], params[n], rtol=1e-4, atol=1e-6)


def test_windows_are_centred_and_edge_padded():
    feats = np.arange(10, dtype=np.float32)[:, None].repeat(9, axis=1)
    w = sequences.windows_for(feats, np.array([0, 5, 9]))
    np.testing.assert_array_equal(w[:, :, 0], [[0, 0, 0, 1, 2], [3, 4, 5, 6, 7], [7, 8, 9, 9, 9]])
