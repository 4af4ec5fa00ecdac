"""Training (loss falls, resume, card) and evaluation (RMSE against numpy, reports, bad input).

Real Keras training of a tiny LSTM on tiny 4 mm virtual patients; the CLI is run in-process.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from OEFPredictorLib import evaluate, methods, models, physics, simulate
from OEFPredictorLib.training import lstm as train
from OEFPredictorLib.cli import main
from OEFPredictorLib.errors import InputError

TINY = {"architecture": "lstm", "cell": "lstm", "units": [16, 8], "dense": [16]}


def tiny_config(**kw):
    base = dict(custom_spec=TINY, epochs=3, batch_size=64, learning_rate=3e-3, max_voxels=1500,
                patients=("P01", "P02"), seed=3)
    return train.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tiny_noisy_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny.keras"
    card = train.train(tiny_noisy_dataset, out, tiny_config(), command="test", verbose=0)
    return out, card


def test_tiny_model_trains_and_its_loss_falls(trained):
    out, card = trained
    history = train.read_history(out.with_name("tiny.history.csv"))
    assert [int(h["epoch"]) for h in history] == [0, 1, 2]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    t = card["training"]
    assert t["train_samples"] == 1200 and t["validation_samples"] == 300
    assert t["snr"] == 100.0 and t["qsm_noise_ppb"] == 2.0 and t["patients"] == ["P01", "P02"]
    assert t["best_val_loss"] == pytest.approx(min(h["val_loss"] for h in history))
    assert card["sha256"] == models.sha256_of(out)


def test_samples_stay_in_the_metric_mask_and_windows_in_their_patient(tiny_noisy_dataset):
    s = train.gather_samples(tiny_noisy_dataset, ("P01", "P02"))
    p1 = simulate.load_patient(tiny_noisy_dataset / "P01")
    assert s.voxels_per_patient["P01"] == int(p1.metric_mask.sum())
    # the first window of P02 is edge-padded with P02's first voxel, not P01's last ones
    first_p2 = np.argmax(s.lo > 0)
    w = s.windows(np.array([first_p2]), 5, "centre")[0]
    n1 = int(p1.mask.sum())
    assert s.lo[first_p2] == n1
    np.testing.assert_array_equal(w[0], s.features[max(n1, s.centre[first_p2] - 2)])
    # each batch pairs a window with its own target voxel (shuffled order included)
    rows = np.arange(0, len(s), 7)
    batches = train.make_sequence(s, rows, s.raw_targets, 32, 5, "centre", True, 0)
    x, y = batches[1]
    for xi, yi in zip(x, y):
        (match,) = np.flatnonzero((s.raw_targets[rows] == yi).all(axis=1))[:1]
        np.testing.assert_array_equal(xi, s.windows(rows[[match]], 5, "centre")[0])
    rel_s0 = s.raw_targets[:, 0]
    assert 0.5 < rel_s0.min() and rel_s0.max() < 2.5  # S0 relative to echo 1


def test_resume_continues_from_the_checkpoint(tiny_noisy_dataset, tmp_path):
    out = tmp_path / "r.keras"
    train.train(tiny_noisy_dataset, out, tiny_config(epochs=1), verbose=0)
    card = train.train(tiny_noisy_dataset, out, tiny_config(epochs=2), resume=True, verbose=0)
    history = train.read_history(tmp_path / "r.history.csv")
    assert [int(h["epoch"]) for h in history] == [0, 1]
    assert card["training"]["epochs_run"] == 2
    with pytest.raises(InputError, match="options differ"):
        train.train(tiny_noisy_dataset, out, tiny_config(epochs=3, seed=4), resume=True, verbose=0)


def test_evaluate_rmse_equals_numpy(tiny_noisy_dataset, monkeypatch):
    """A method with known errors: evaluate's numbers must equal a direct numpy computation."""
    def factory(ctx):
        def predict(patient, targets):
            t = {k: v[patient.mask][targets].astype(np.float64) for k, v in patient.truth.items()}
            wobble = np.sin(np.arange(len(targets)))
            return {"S0": t["S0"] * 1.05, "R2": t["R2"] + 2.0 * wobble, "Y": np.clip(t["Y"] + 0.03 * wobble, 0, 1),
                    "v": t["v"] - 0.004, "chi_nb": t["chi_nb"] + 0.01 * wobble}
        return predict

    monkeypatch.setitem(evaluate.METHODS, "known", factory)
    ev = evaluate.evaluate(tiny_noisy_dataset, ["known"], patients=["P03"])
    row = ev.per_patient[0]
    p = simulate.load_patient(tiny_noisy_dataset / "P03")
    m = p.metric_mask
    wobble = np.sin(np.arange(int(m.sum())))
    truth = {k: v[m].astype(np.float64) for k, v in p.truth.items()}
    y = np.clip(truth["Y"] + 0.03 * wobble, 0, 1)
    expected = {
        "S0": np.sqrt(np.mean((0.05 * truth["S0"] / p.echoes[..., 0][m]) ** 2)),
        "R2": np.sqrt(np.mean((2.0 * wobble) ** 2)),
        "Y": np.sqrt(np.mean((y - truth["Y"]) ** 2)),
        "v": 0.004,
        "chi_nb": np.sqrt(np.mean((0.01 * wobble) ** 2)),
        "OEF": np.sqrt(np.mean((100 * (1 - y / 0.98) - truth["OEF"]) ** 2)),
    }
    assert row["n_voxels"] == int(m.sum())
    for k, value in expected.items():
        assert row[f"rmse_{k}"] == pytest.approx(value, rel=1e-5), k
    assert row["bias_v"] == pytest.approx(-0.004, rel=1e-5)


def test_train_and_evaluate_commands_write_labelled_tables(tiny_noisy_dataset, trained, tmp_path, capsys):
    model, _ = trained
    code = main(["evaluate", "--data", str(tiny_noisy_dataset), "--model", str(model),
                 "--methods", "lstm,tissue_mean", "--out", str(tmp_path / "ev"), "--record-in-card"])
    assert code == 0
    text = capsys.readouterr().out
    assert "SNR 100, QSM noise 2 ppb" in text and "Table 2 (lstm)" in text and "tissue_mean" in text
    rows = (tmp_path / "ev" / "per_patient.csv").read_text().splitlines()
    assert rows[0].startswith("snr,qsm_noise_ppb,method,patient") and len(rows) == 3  # P03 x 2 methods
    summary = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["summary"]
    card = json.loads(model.with_suffix(".json").read_text())
    assert card["test_metrics"]["SNR 100"]["rmse_OEF"] == pytest.approx(summary[0]["rmse_OEF"], abs=1e-4)
    models.load_bundle(model)  # the card update keeps the checksum valid


def test_evaluate_refuses_a_protocol_mismatch_and_bad_options(tiny_noisy_dataset, trained, capsys):
    model, _ = trained
    bundle = models.load_bundle(model)
    p = simulate.load_patient(tiny_noisy_dataset / "P03")
    other = dataclasses.replace(p, protocol=physics.Protocol.from_milliseconds([5 + 5 * i for i in range(8)], 3.0))
    with pytest.raises(InputError, match="differs in its echo times from the model's"):
        evaluate.engine_predictor(methods.of_card(bundle.card), bundle)(other, np.arange(10))
    assert main(["evaluate", "--data", str(tiny_noisy_dataset), "--model", str(model), "--methods", "cat9"]) == 2
    assert "Unknown method" in capsys.readouterr().err
    assert main(["train", "--data", str(tiny_noisy_dataset), "--out", "x.h5"]) == 2


def test_tissue_oracle_rmse_is_the_within_tissue_spread(tiny_noisy_dataset):
    ev = evaluate.evaluate(tiny_noisy_dataset, ["tissue_oracle"], patients=["P03"])
    p = simulate.load_patient(tiny_noisy_dataset / "P03")
    m = p.metric_mask
    labels, oef = p.labels[m], p.truth["OEF"][m].astype(np.float64)
    lesion = np.isin(labels, [6, 7])
    pred_y = np.empty_like(oef)
    y = p.truth["Y"][m].astype(np.float64)
    for lab in np.unique(labels[~lesion]):
        pred_y[labels == lab] = y[(labels == lab)].mean()
    pred_y[lesion] = y[~lesion].mean()
    expected = np.sqrt(np.mean((100 * (1 - pred_y / 0.98) - oef) ** 2))
    assert ev.per_patient[0]["rmse_OEF"] == pytest.approx(expected, rel=1e-4)
