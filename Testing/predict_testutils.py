"""A tiny real Keras model bundle for the prediction tests (trained a few steps on a virtual
patient; its accuracy does not matter, only that it is a real bundle the engine must run exactly)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np

TINY_SPEC = {"architecture": "lstm", "cell": "lstm", "units": [8, 8, 8, 8], "dense": [8, 8, 8]}


@functools.lru_cache(maxsize=None)
def tiny_model_path(dataset: str, spec_key: str = "lstm") -> Path:
    """Train and save a tiny bundle once per test session (cached by data set)."""
    import keras

    from OEFPredictorLib import models, physics, sequences, simulate

    keras.utils.set_random_seed(0)
    spec = TINY_SPEC if spec_key == "lstm" else {"architecture": "mlp", "dense": [8, 8]}
    length = sequences.WINDOW_LENGTH if spec_key == "lstm" else 1
    data = simulate.load_patient(Path(dataset) / "P01")
    idx = np.flatnonzero(data.mask)
    e = data.echoes.reshape(-1, data.echoes.shape[-1])[idx]
    q = data.qsm.reshape(-1)[idx]
    features, echo1 = sequences.voxel_features(e, q, 10.0)
    truth = {n: data.truth[n].reshape(-1)[idx] for n in physics.PARAMETER_NAMES}
    t = np.stack([truth["S0"] / echo1 if n == "S0" else truth[n] for n in physics.PARAMETER_NAMES], axis=1)
    scaling = models.fit_output_scaling(t)
    y = models.encode_targets(truth, echo1, scaling)
    x = sequences.make_windows(features, 0, len(features), length, "centre")[::4]  # a few steps suffice
    y = y[::4]
    model = models.build_model(spec, window_length=length)
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, batch_size=256, verbose=0)
    card = models.make_card(spec, data.protocol, scaling, length, "centre")
    out = Path(tempfile.mkdtemp(prefix="tiny_model_")) / f"tiny_{spec_key}.keras"
    return models.save_bundle(model, card, out)


TINY_UNET = {"architecture": "unet", "filters": [4, 8], "convs_per_block": 1}


@functools.lru_cache(maxsize=None)
def tiny_spatial_model_path(dataset: str) -> Path:
    """A tiny real spatial bundle (2-level U-Net, a few steps on one 4 mm patient, 4 mm model grid)."""
    import keras

    from OEFPredictorLib import models, physics, simulate, spatial

    keras.utils.set_random_seed(0)
    data = simulate.load_patient(Path(dataset) / "P01")
    mask = data.mask
    x = spatial.volume_features(data.echoes, data.qsm, mask, 10.0)
    pad = [(0, (-n) % 2) for n in mask.shape]
    x = np.pad(x, pad + [(0, 0)])
    t = np.stack([np.where(mask, data.truth[n] / np.where(mask, data.echoes[..., 0], 1), 0) if n == "S0"
                  else data.truth[n] for n in physics.PARAMETER_NAMES], axis=-1)
    scaling = models.fit_output_scaling(t[mask])
    z = np.where(mask[..., None], (t - scaling["mean"]) / np.array(scaling["std"]), 0)
    y = np.concatenate([z, (1 - data.truth["Y"] / physics.YA)[..., None], data.metric_mask[..., None]], axis=-1)
    y = np.pad(y, pad + [(0, 0)]).astype(np.float32)
    model = models.build_model(TINY_UNET, n_features=x.shape[-1], n_outputs=spatial.N_OUTPUTS)
    model.compile(optimizer="adam", loss=spatial.make_loss(scaling))
    model.fit(x[None], y[None], epochs=2, verbose=0)
    card = models.make_card(TINY_UNET, data.protocol, scaling, 1, "centre",
                            spatial={"voxel_size_mm": 4.0, "interval_scale": 1.0},
                            window={"length": 1, "target": "centre", "order": "whole volume", "padding": "zeros"})
    out = Path(tempfile.mkdtemp(prefix="tiny_unet_")) / "tiny_unet.keras"
    return models.save_bundle(model, card, out)
