"""The RNST outer loop on one 2D slice, and its presets.

Published algorithm (Shen et al.'s code, utils/optimizer.py, RNST.solve_RNST), with x0 the
low-field slice scaled to [0, 1]:

    for each outer iteration i:
        x <- minmax(x)
        start <- denoise(x) if i == 0 else x                  (their denoiser: BM3D)
        T_1, T_2, T_3 <- style transfer from minmax(start), continued in place for budgets
                         b1, then b2 more, then b3 more evaluations (500/600/700)
        D <- T_3                                               (the in-place start ends as T_3)
        candidates x - mu_k [(x - T_j) + lambda (x - D)], mu_k = k mu, k = 1..5, mu = 0.15,
                   lambda = 0.7; the one with the lowest style-transfer loss is kept
    return the iterate with the lowest loss

The reference image is never looked at (the published code's optional "hybrid" score uses it; its
default does not). Deliberate differences, and why:
- A candidate's score is the style-transfer loss of minmax(candidate). The published code scores
  it after one more PyTorch L-BFGS step from it (about 20 evaluations per candidate, 300 per
  iteration): as costly as the style transfer itself on a CPU, for a ranking of 15 images.
- The output is clipped to [0, 1], the content's intensity range (unclipped in the published code).
- `denoiser`: BM3D as published where the `bm3d` package is installed (its licence allows
  non-commercial use only, and no redistribution: this project does not install it); non-local
  means (scikit-image) otherwise. Their BM3D is given the known noise level; here it is
  estimated from the image (Immerkaer's method).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import RNSTInputError

DENOISERS = ("nlm", "bm3d")


@dataclass(frozen=True)
class Preset:
    name: str
    outer_iterations: int
    budgets: tuple            # L-BFGS evaluations of the candidates T_j (each continues the last)
    mu: float = 0.15
    step_multipliers: tuple = (1, 2, 3, 4, 5)
    lam: float = 0.7
    denoiser: str = "nlm"


PRESETS = {
    # Sized for 2 CPU cores (a 3-slice 140 x 118 slab in about 2.5 CPU minutes): the published
    # loop with one outer iteration and 40 + 40 + 40 evaluations, started from non-local means.
    "fast": Preset("fast", outer_iterations=1, budgets=(40, 40, 40)),
    # The published settings (engine_settings (20, 0.15, 0.7, 5, 3), 500 + 100 j steps, BM3D).
    "paper": Preset("paper", outer_iterations=20, budgets=(500, 600, 700), denoiser="bm3d"),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise RNSTInputError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    preset = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    check_denoiser(preset.denoiser)
    if preset.outer_iterations < 1:
        raise RNSTInputError("iterations must be at least 1")
    return preset


def bm3d_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("bm3d") is not None


def check_denoiser(kind: str) -> None:
    if kind not in DENOISERS:
        raise RNSTInputError(f"unknown denoiser {kind!r}: choose nlm or bm3d")
    if kind == "bm3d" and not bm3d_available():
        raise RNSTInputError(
            "the bm3d denoiser needs the 'bm3d' package, which this tool does not install (its "
            "licence allows non-commercial use only): pip install bm3d==4.0.3, or use --denoiser nlm")


def denoise(image: np.ndarray, kind: str = "nlm") -> np.ndarray:
    """Non-local means (scikit-image) or BM3D (the optional `bm3d` package), noise level
    estimated from the image."""
    image = np.asarray(image, np.float64)
    sigma = noise_sigma(image)
    if sigma <= 0:
        return image.copy()
    if kind == "nlm":
        from skimage.restoration import denoise_nl_means
        return denoise_nl_means(image, h=0.8 * sigma, sigma=sigma, patch_size=5,
                                patch_distance=6, fast_mode=True)
    check_denoiser(kind)
    import bm3d
    return np.asarray(bm3d.bm3d(image, sigma_psd=sigma, stage_arg=bm3d.BM3DStages.ALL_STAGES),
                      np.float64)


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


def minmax01(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


@dataclass
class SliceResult:
    image: np.ndarray
    losses: list = field(default_factory=list)   # chosen candidate's loss per iteration
    steps: list = field(default_factory=list)    # (budget, step size) chosen per iteration
    initial_loss: float = float("nan")


def rnst_slice(content: np.ndarray, style: np.ndarray, model, preset: Preset, backbone=None,
               cancel: threading.Event | None = None, on_eval=None) -> SliceResult:
    """RNST of one slice at its full resolution. `content` and `style` are 2D arrays scaled to
    [0, 1] (any sizes); `model` comes from nst.build_model with `backbone` (default VGG16).
    `on_eval(n)` is called after every loss or gradient evaluation (n counts them here)."""
    from .nst import VGG16_TORCH, StyleTransfer

    content = np.asarray(content, np.float32)
    problem = StyleTransfer(model, content, np.asarray(style, np.float32),
                            backbone or VGG16_TORCH)
    counter = {"n": 0}

    def count(_=None):
        counter["n"] += 1
        if on_eval is not None:
            on_eval(counter["n"])

    x = content.astype(np.float64)
    # Every working image is scaled to the content's own range (the published code scales to
    # [0, 1], which lifts a dim slice of a volume to full brightness).
    lo, hi = float(content.min()), float(content.max())

    def scaled(a):
        return lo + (hi - lo) * minmax01(a)

    result = SliceResult(image=content, initial_loss=problem.loss(content))
    best_loss, best_x = np.inf, x
    for i in range(preset.outer_iterations):
        x = scaled(x)
        start = denoise(x, preset.denoiser) if i == 0 else x
        nst = problem.run(scaled(start).astype(np.float32), preset.budgets, cancel=cancel,
                          on_eval=lambda n: count())
        d = nst.images[-1].astype(np.float64)
        candidates = []
        for k in preset.step_multipliers:
            step = preset.mu * k
            for budget, t in zip(np.cumsum(preset.budgets), nst.images):
                cand = x - step * ((x - t) + preset.lam * (x - d))
                loss = problem.loss(scaled(cand).astype(np.float32))
                count()
                candidates.append((loss, int(budget), step, cand))
        loss, budget, step, x = min(candidates, key=lambda c: c[0])
        result.losses.append(float(loss))
        result.steps.append((budget, float(step)))
        if loss < best_loss:
            best_loss, best_x = loss, x
    result.image = np.clip(best_x, 0.0, 1.0).astype(np.float32)
    return result


def evaluations_per_slice(preset: Preset) -> int:
    """What on_eval will count for one slice (for progress bars and time estimates)."""
    candidates = len(preset.budgets) * len(preset.step_multipliers)
    # scipy may evaluate once or twice past maxfun before stopping; close enough for progress.
    return preset.outer_iterations * (sum(preset.budgets) + candidates)


# Wall seconds per loss-and-gradient evaluation per megapixel of slice, VGG16 to conv4_1, on 2
# idle CPU cores: the CPU time of benchmarks/bench_rnst.py (24 CPU seconds) over 1.5 busy cores;
# the candidates' forward-only evaluations cost about a third of one. A loaded machine is slower.
CPU_SECONDS_PER_EVAL_MPIX = 16.0


def estimate_seconds(preset: Preset, slice_shape, n_slices: int) -> float:
    """Rough run time on 2 idle CPU cores (a GPU is much faster), for the panel and the CLI."""
    mpix = float(np.prod(slice_shape)) / 1e6
    evals = sum(preset.budgets) + len(preset.budgets) * len(preset.step_multipliers) / 3
    return n_slices * (preset.outer_iterations * evals * mpix * CPU_SECONDS_PER_EVAL_MPIX + 1.0)
