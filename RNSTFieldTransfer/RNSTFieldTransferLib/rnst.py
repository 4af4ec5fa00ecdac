"""The RNST outer loop on one 2D slice, and its presets.

RED-style update (Romano et al.), with the style-transfer output T(x) in place of a denoiser's
residual and a denoiser D as a second regulariser:

    x <- x - mu_k [(x - T_j(x)) + lambda (x - D)]

T_j: NST from the current estimate with budgets 500/600/700 loss evaluations (three candidates),
mu_k in mu, 2mu .. 5mu (mu = 0.15), lambda = 0.7, D the denoised low-field image (computed once,
at the first iteration). Of the candidates the one with the lowest style-transfer loss is kept
(the reference image is never looked at); after all iterations the iterate with the lowest loss
is returned.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import RNSTInputError


@dataclass(frozen=True)
class Preset:
    name: str
    outer_iterations: int
    budgets: tuple            # L-BFGS loss evaluations of the candidates T_j
    max_size: int | None      # larger slices are resized to fit, and the result resized back
    mu: float = 0.15
    step_multipliers: tuple = (1, 2, 3, 4, 5)
    lam: float = 0.7
    denoiser: str = "nlm"     # "nlm" (non-local means) or "tv" (total variation), scikit-image


PRESETS = {
    # What the paper's code does: native size, 20 iterations, 500/600/700 evaluations.
    "paper": Preset("paper", outer_iterations=20, budgets=(500, 600, 700), max_size=None),
    # For 2 shared CPU cores (about a minute per slice): at most 96 pixels a side, 2 iterations,
    # 60/80/100 evaluations. Fewer evaluations per iteration gained less SSIM for the same time
    # on the demo slice (3 x 30/40/50: +0.06; 2 x 60/80/100: +0.11).
    "fast": Preset("fast", outer_iterations=2, budgets=(60, 80, 100), max_size=96),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise RNSTInputError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def denoise(image: np.ndarray, kind: str = "nlm") -> np.ndarray:
    """scikit-image denoiser (BM3D, used in the paper, may not be redistributed)."""
    from skimage.restoration import denoise_nl_means, denoise_tv_chambolle
    image = np.asarray(image, np.float64)
    if kind == "nlm":
        sigma = noise_sigma(image)
        if sigma <= 0:
            return image.copy()
        return denoise_nl_means(image, h=0.8 * sigma, sigma=sigma, patch_size=5,
                                patch_distance=6, fast_mode=True)
    if kind == "tv":
        return denoise_tv_chambolle(image, weight=0.1)
    raise RNSTInputError(f"unknown denoiser {kind!r}: choose nlm or tv")


def noise_sigma(image: np.ndarray) -> float:
    """Gaussian noise level by Immerkaer's (1996) Laplacian-difference estimate; scikit-image's
    estimate_sigma would need PyWavelets, one more package for one number."""
    from scipy.signal import convolve2d
    mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], float)
    h, w = image.shape
    if h < 3 or w < 3:
        return 0.0
    total = np.abs(convolve2d(image, mask, mode="valid")).sum()
    return float(np.sqrt(np.pi / 2) * total / (6.0 * (h - 2) * (w - 2)))


@dataclass
class SliceResult:
    image: np.ndarray
    losses: list = field(default_factory=list)   # chosen candidate's loss per iteration
    steps: list = field(default_factory=list)    # (budget, step size) chosen per iteration
    initial_loss: float = float("nan")


def _fit(image: np.ndarray, max_size: int | None) -> np.ndarray:
    if not max_size or max(image.shape) <= max_size:
        return image
    from skimage.transform import resize
    scale = max_size / max(image.shape)
    shape = tuple(max(8, int(round(s * scale))) for s in image.shape)
    return resize(image, shape, order=1, anti_aliasing=True, preserve_range=True)


def rnst_slice(content: np.ndarray, style: np.ndarray, model, preset: Preset,
               cancel: threading.Event | None = None, on_eval=None) -> SliceResult:
    """RNST of one slice. `content` and `style` are 2D arrays scaled to [0, 1] (any sizes);
    `model` is nst.build_vgg16_features(...). `on_eval(n)` is called after every loss or
    gradient evaluation (n counts them in this slice)."""
    from .nst import StyleTransfer

    content = np.asarray(content, np.float32)
    work = _fit(content, preset.max_size).astype(np.float32)
    # The style image is resized by the same factor, so Gram statistics are compared at one scale.
    scale = work.shape[0] / content.shape[0]
    style_work = _fit(np.asarray(style, np.float32),
                      int(round(max(style.shape) * scale)) if scale < 1 else None)
    problem = StyleTransfer(model, work, style_work.astype(np.float32))
    denoised = denoise(work, preset.denoiser).astype(np.float32)

    counter = {"n": 0}

    def count(_=None):
        counter["n"] += 1
        if on_eval is not None:
            on_eval(counter["n"])

    x = work.copy()
    result = SliceResult(image=x, initial_loss=problem.loss(x))
    best_loss, best_x = np.inf, x
    for _ in range(preset.outer_iterations):
        nst = problem.run(x, preset.budgets, cancel=cancel, on_eval=lambda n: count())
        candidates = []
        for budget, t in zip(sorted(preset.budgets), nst.images):
            for k in preset.step_multipliers:
                step = preset.mu * k
                cand = np.clip(x - step * ((x - t) + preset.lam * (x - denoised)), 0.0, 1.0)
                candidates.append((problem.loss(cand), budget, step, cand.astype(np.float32)))
                count()
        loss, budget, step, x = min(candidates, key=lambda c: c[0])
        result.losses.append(float(loss))
        result.steps.append((int(budget), float(step)))
        if loss < best_loss:
            best_loss, best_x = loss, x
    if best_x.shape != content.shape:
        from skimage.transform import resize
        best_x = resize(best_x, content.shape, order=1, preserve_range=True).astype(np.float32)
    result.image = best_x
    return result


def evaluations_per_slice(preset: Preset) -> int:
    """What on_eval will count for one slice (for progress bars)."""
    candidates = len(preset.budgets) * len(preset.step_multipliers)
    # scipy may evaluate once or twice past maxfun before stopping; close enough for progress.
    return preset.outer_iterations * (max(preset.budgets) + candidates)
