"""RNST core: Gram matrix and losses against hand-computed values, the gradient against finite
differences, the VGG16 weights against their committed checksum, planes and slice ranges."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "RNSTFieldTransfer"))

from RNSTFieldTransferLib import nst, volume, weights  # noqa: E402
from RNSTFieldTransferLib.errors import RNSTInputError  # noqa: E402


def test_gram_matrix_hand_computed():
    # Features (H=1, W=2, C=2): pixel 0 = (1, 2), pixel 1 = (3, 4).
    # F (C x HW) = [[1, 3], [2, 4]]; F F^T = [[10, 14], [14, 20]]; / (C H W = 4).
    f = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)
    g = np.asarray(nst.gram_matrix(f))
    np.testing.assert_allclose(g, [[2.5, 3.5], [3.5, 5.0]], rtol=1e-6)
    # A batch axis is accepted and changes nothing.
    np.testing.assert_allclose(np.asarray(nst.gram_matrix(f[None])), g, rtol=1e-6)


def test_losses_hand_computed():
    a = np.array([[[1.0], [-2.0]]], np.float32)
    b = np.array([[[0.0], [2.0]]], np.float32)
    assert float(nst.content_loss(a, b)) == pytest.approx((1 + 4) / 2)  # L1 = mean |a - b|
    f1 = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)   # Gram [[2.5, 3.5], [3.5, 5]]
    f2 = np.array([[[2.0]]], np.float32)                     # Gram [[4]]
    targets = [np.zeros((2, 2), np.float32), np.array([[1.0]], np.float32)]
    # mean(2.5, 3.5, 3.5, 5) = 3.625, plus |4 - 1| = 3
    assert float(nst.style_loss([f1, f2], targets)) == pytest.approx(6.625)


def test_layer_names():
    assert nst.keras_layer_name("conv2_2") == "block2_conv2"
    assert nst.STYLE_LAYERS == ("conv1_1", "conv1_2", "conv2_1", "conv2_2",
                                "conv3_1", "conv3_2", "conv3_3", "conv4_1")
    assert nst.CONTENT_LAYER == "conv2_2"
    assert (nst.STYLE_WEIGHT, nst.CONTENT_WEIGHT) == (5000.0, 1.0)


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    cache = tmp_path_factory.mktemp("rnst_cache")
    return cache, weights.load_vgg16_conv_weights(cache_dir=cache)


def test_extracted_weights_match_committed_checksum(vgg_weights):
    cache, w = vgg_weights
    assert weights.weights_digest(w) == weights.VGG16_CONV_SHA256
    assert len(w) == 26 and w["block1_conv1/kernel"].shape == (3, 3, 3, 64)
    # ImageNet VGG16's first bias (Keras' vgg16 notop file); a fine-tuned base would differ.
    assert w["block1_conv1/bias"][0] == pytest.approx(0.73429835, abs=1e-6)
    cached = cache / weights.CACHE_FILE_NAME
    assert cached.is_file()
    # A tampered cache is not trusted: it is extracted again and the checksum holds.
    bad = dict(w)
    bad["block3_conv1/bias"] = w["block3_conv1/bias"] + 1e-3
    weights.save_npz_atomic(bad, cached)
    with pytest.raises(RNSTInputError, match="does not match"):
        weights.load_weights_file(cached, verify=True)
    again = weights.load_vgg16_conv_weights(cache_dir=cache)
    assert weights.weights_digest(again) == weights.VGG16_CONV_SHA256


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(RNSTInputError, match="not found"):
        weights.load_vgg16_conv_weights(tmp_path / "nope.h5")


def test_gradient_matches_finite_difference(vgg_weights):
    _, w = vgg_weights
    rng = np.random.default_rng(1)
    content = rng.uniform(0.2, 0.8, (24, 24)).astype(np.float32)
    style = rng.uniform(0, 1, (32, 28)).astype(np.float32)  # another size is fine
    problem = nst.StyleTransfer(nst.build_vgg16_features(w), content, style)
    total, ls, lc = problem.loss_terms(content)
    assert lc == pytest.approx(0.0, abs=1e-4)  # content loss of the content itself
    assert total == pytest.approx(5000 * ls, rel=1e-5)
    x = content.copy()
    _, grad = problem._value_and_grad(x[None, :, :, None])
    grad = np.asarray(grad)[0, :, :, 0].astype(np.float64)
    d = rng.normal(0, 1, x.shape).astype(np.float32)
    eps = 1e-3
    fd = (problem.loss(x + eps * d) - problem.loss(x - eps * d)) / (2 * eps)
    assert fd == pytest.approx(float((grad * d).sum()), rel=0.05)


def test_planes_follow_the_direction_matrix():
    assert volume.slicing_axis("axial") == 0          # numpy (k, j, i): k runs along z
    assert volume.slicing_axis("coronal") == 1
    assert volume.slicing_axis("sagittal") == 2
    # A volume stored sagittally: i along A, j along S, k along L.
    d = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)
    assert volume.slicing_axis("sagittal", d) == 0
    assert volume.slicing_axis("axial", d) == 1
    assert volume.slicing_axis("coronal", d) == 2


def test_parse_slices():
    assert volume.parse_slices("2:5", 10) == range(2, 5)
    assert volume.parse_slices(":3", 10) == range(0, 3)
    assert volume.parse_slices(None, 4) == range(4)
    for bad in ("5:5", "12:20", "a:b", "3"):
        with pytest.raises(RNSTInputError):
            volume.parse_slices(bad, 10)


def test_quality_metrics():
    ref = np.linspace(0, 1, 400).reshape(20, 20)
    p, s = volume.quality(ref * 3 + 7, ref)  # min-max scaling removes gain and offset
    assert s == pytest.approx(1.0) and p > 100
    noisy = ref + np.random.default_rng(0).normal(0, 0.05, ref.shape)
    p2, s2 = volume.quality(noisy, ref)
    assert p2 < 40 and s2 < 0.99
