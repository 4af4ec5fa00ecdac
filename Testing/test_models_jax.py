"""Every bundled model predicts the same under Keras' JAX backend (CPU) as under TensorFlow: the
models are backend-agnostic .keras files, so they run where TensorFlow has no GPU build.

Each backend runs in its own subprocess (Keras picks its backend once per process, from
KERAS_BACKEND), on the same random inputs shaped from each model's input signature (the
TensorFlow run draws them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from OEFPredictorLib import resources

SCRIPT = r"""
import json, os, sys
import numpy as np
import keras
from OEFPredictorLib import models as bundles

paths, inputs, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
models = [bundles.load_bundle(p).model for p in paths]  # as the product loads them (card, checksum)
def shape(model):  # voxel models: a batch of 64; spatial ones (free axes): 2 volumes of 32^3
    dims = list(model.inputs[0].shape[1:])
    return [2 if None in dims else 64] + [d or 32 for d in dims]

def draw(model, rng):  # standard normal, or on the scale of a model's own Normalization layer
    x = rng.normal(size=shape(model))
    norm = [layer for layer in model.layers if type(layer).__name__ == "Normalization"]
    if norm:  # far outside it, float32 round-off between backends would dominate the comparison
        x = np.asarray(norm[0].mean).reshape(-1) + np.sqrt(np.asarray(norm[0].variance)).reshape(-1) * x
    return x.astype(np.float32)

if not os.path.exists(inputs):  # the first run draws the inputs
    rng = np.random.default_rng(0)
    np.savez(inputs, **{str(i): draw(m, rng) for i, m in enumerate(models)})
data = np.load(inputs)
result = {str(i): np.asarray(m.predict_on_batch(data[str(i)]), dtype=np.float64) for i, m in enumerate(models)}
np.savez(out, backend=np.array(keras.backend.backend()), **result)
"""


def bundled_models() -> list[Path]:
    try:
        folder = resources.resource_path("Models")
    except FileNotFoundError:
        return []
    return sorted(folder.glob("*.keras"))


def _run(backend: str, paths: list[Path], inputs: Path, out: Path) -> dict:
    lib = str(Path(__file__).resolve().parent.parent / "OEFPredictor")
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([lib] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([str(p) for p in paths]), str(inputs), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def test_every_bundled_model_predicts_the_same_under_jax_and_tensorflow(tmp_path):
    pytest.importorskip("jax")
    paths = bundled_models()
    assert paths, "no bundled model found through resources.resource_path('Models')"
    tf = _run("tensorflow", paths, tmp_path / "inputs.npz", tmp_path / "tf.npz")
    jx = _run("jax", paths, tmp_path / "inputs.npz", tmp_path / "jax.npz")
    assert str(tf["backend"]) == "tensorflow" and str(jx["backend"]) == "jax"
    for i, path in enumerate(paths):
        a, b = tf[str(i)], jx[str(i)]
        assert a.shape == b.shape and np.all(np.isfinite(a)), path.name
        assert np.std(a) > 1e-3, f"{path.name}: constant outputs would make the comparison meaningless"
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4, err_msg=path.name)
        print(f"{path.name}: max |JAX - TensorFlow| = {np.abs(b - a).max():.2e} over {a.size} outputs")
