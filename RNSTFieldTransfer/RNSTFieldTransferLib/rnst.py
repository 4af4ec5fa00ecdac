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
- The working images are scaled to the range of the slice's content (in a volume scaled as a
  whole), not to [0, 1], so that slices keep their relative brightness.
- `denoiser`: by default non-local means over the slice and its neighbours ("nlm-2.5d",
  scikit-image); "nlm" the slice alone; BM3D as published where the `bm3d` package is installed
  (its licence allows non-commercial use only, and no redistribution: this project does not
  install it). Their BM3D is given the known noise level; here it is estimated from the image
  (Immerkaer's method).
- `prior`: the image D of the RED term lambda (x - D). Published: D = T_3, the style transfer's
  own image ("style"). The `fast` preset uses the denoiser's image of the low-field slice
  ("denoiser": D = denoise(x0), as in Romano et al.'s RED, where D is a denoiser), so that a
  candidate is a blend of the style transfer and the denoised slice: where the style image is
  another subject, the style transfer alone drifts from the low field's anatomy and contrast,
  and the blend keeps it anchored (benchmarks/results/rnst.md). With one outer iteration D is
  exactly the start of the style transfer; it stays that image in later iterations.
- Several slices of one size may be optimised together (a GPU batch): one L-BFGS run on the sum
  of their independent losses, each slice keeping its own best images, candidates and choice.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import numpy as np

from .errors import RNSTInputError

DENOISERS = ("nlm-2.5d", "nlm", "bm3d")
PRIORS = ("denoiser", "style")   # D of the RED term: the denoised slice, or T_3 (published)


@dataclass(frozen=True)
class Preset:
    name: str
    outer_iterations: int
    budgets: tuple            # L-BFGS evaluations of the candidates T_j (each continues the last)
    mu: float = 0.15
    step_multipliers: tuple = (1, 2, 3, 4, 5)
    lam: float = 0.7
    denoiser: str = "nlm-2.5d"
    prior: str = "denoiser"   # see PRIORS


PRESETS = {
    # Sized for 2 CPU cores (a 3-slice 139 x 115 slab in about 3.5 CPU minutes): the published
    # loop with one outer iteration and 40 + 40 + 40 evaluations, started from non-local means
    # over the slice and its neighbours (it beat BM3D as the start, benchmarks/rnst_denoisers.py),
    # with that denoised slice as the RED prior D.
    "fast": Preset("fast", outer_iterations=1, budgets=(40, 40, 40), denoiser="nlm-2.5d",
                   prior="denoiser"),
    # The published settings (engine_settings (20, 0.15, 0.7, 5, 3), 500 + 100 j steps, BM3D,
    # D = T_3).
    "paper": Preset("paper", outer_iterations=20, budgets=(500, 600, 700), denoiser="bm3d",
                    prior="style"),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise RNSTInputError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    preset = replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    check_denoiser(preset.denoiser)
    if preset.prior not in PRIORS:
        raise RNSTInputError(f"unknown prior {preset.prior!r}: choose one of {', '.join(PRIORS)}")
    if preset.outer_iterations < 1:
        raise RNSTInputError("iterations must be at least 1")
    return preset


def bm3d_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("bm3d") is not None


def check_denoiser(kind: str) -> None:
    if kind not in DENOISERS:
        raise RNSTInputError(f"unknown denoiser {kind!r}: choose one of {', '.join(DENOISERS)}")
    if kind == "bm3d" and not bm3d_available():
        raise RNSTInputError(
            "the bm3d denoiser needs the 'bm3d' package, which this tool does not install (its "
            "licence allows non-commercial use only): pip install bm3d==4.0.3, or use --denoiser nlm-2.5d")


# Non-local means with patches over the slice and its neighbours (skimage's channel axis): the
# neighbours carry their own noise, so similar patches are found more reliably; h and the search
# window were chosen on virtual patient 1 (benchmarks/rnst_denoisers.py). Only the weights use
# the neighbours; the average is over the slice's own pixels.
NLM_25D = {"h": 0.7, "patch_size": 5, "patch_distance": 11}


def denoise(image: np.ndarray, kind: str = "nlm", neighbours=()) -> np.ndarray:
    """Non-local means (scikit-image) in 2D ("nlm") or with the neighbouring slices
    ("nlm-2.5d"; without neighbours it works on the slice alone), or BM3D (the optional `bm3d`
    package); noise level estimated from the image."""
    image = np.asarray(image, np.float64)
    sigma = noise_sigma(image)
    if sigma <= 0:
        return image.copy()
    from skimage.restoration import denoise_nl_means
    if kind == "nlm":
        return denoise_nl_means(image, h=0.8 * sigma, sigma=sigma, patch_size=5,
                                patch_distance=6, fast_mode=True)
    if kind == "nlm-2.5d":
        # Neighbours brought to the slice's brightness (99th percentile), so that patches are
        # compared on one scale even where slice intensities differ.
        top = np.percentile(image, 99)
        stack = np.stack([image, *[np.asarray(n, np.float64) * top / max(np.percentile(n, 99), 1e-12)
                                   for n in neighbours]], axis=-1)
        out = denoise_nl_means(stack, h=NLM_25D["h"] * sigma, sigma=sigma,
                               patch_size=NLM_25D["patch_size"],
                               patch_distance=NLM_25D["patch_distance"], fast_mode=True,
                               channel_axis=-1)
        return out if out.ndim == 2 else out[..., 0]  # one channel comes back 2D
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
               cancel: threading.Event | None = None, on_eval=None,
               neighbours=()) -> SliceResult:
    """RNST of one slice at its full resolution. `content` and `style` are 2D arrays scaled to
    [0, 1] (any sizes); `model` comes from nst.build_model with `backbone` (default VGG16).
    `on_eval(n)` is called after every loss or gradient evaluation (n counts them here).
    `neighbours`: the adjacent content slices (same scaling), for a 2.5D denoiser."""
    return rnst_slices([content], [style], model, preset, backbone, cancel, on_eval,
                       [neighbours])[0]


def rnst_slices(contents, styles, model, preset: Preset, backbone=None,
                cancel: threading.Event | None = None, on_eval=None,
                neighbours=None) -> list:
    """RNST of slices of one size together (a batch through the network at each evaluation,
    for a GPU); each slice keeps its own scaling, candidates and choices. Arguments as for
    rnst_slice, one per slice; returns one SliceResult per slice."""
    from .nst import VGG16_TORCH, StyleTransfer

    content = np.stack([np.asarray(c, np.float32) for c in contents])   # (B, H, W)
    styles = [np.asarray(s, np.float32) for s in styles]
    neighbours = neighbours or [()] * len(content)
    problem = StyleTransfer(model, content, styles, backbone or VGG16_TORCH)
    counter = {"n": 0}

    def count(_=None):
        counter["n"] += 1
        if on_eval is not None:
            on_eval(counter["n"])

    # Every working image is scaled to its content's own range (the published code scales to
    # [0, 1], which would lift a dim slice of a volume to full brightness).
    lo = content.min(axis=(1, 2), keepdims=True).astype(np.float64)
    hi = content.max(axis=(1, 2), keepdims=True).astype(np.float64)

    def scaled(a):
        a_lo = a.min(axis=(1, 2), keepdims=True)
        span = a.max(axis=(1, 2), keepdims=True) - a_lo
        return lo + (hi - lo) * (a - a_lo) / np.where(span > 0, span, 1.0)

    n = len(content)
    rows = np.arange(n)
    results = [SliceResult(image=c, initial_loss=float(v))
               for c, v in zip(content, np.atleast_1d(problem.loss(content)))]
    x = content.astype(np.float64)
    best_loss, best_x = np.full(n, np.inf), x.copy()
    for i in range(preset.outer_iterations):
        x = scaled(x)
        if i == 0:
            denoised = scaled(np.stack([denoise(xs, preset.denoiser, nb)
                                        for xs, nb in zip(x, neighbours)]))
        start = denoised if i == 0 else x
        nst = problem.run(scaled(start).astype(np.float32), preset.budgets, cancel=cancel,
                          on_eval=lambda _: count())
        d = denoised if preset.prior == "denoiser" else nst.images[-1].astype(np.float64)
        losses, choices, cands = [], [], []
        for k in preset.step_multipliers:
            step = preset.mu * k
            for budget, t in zip(np.cumsum(preset.budgets), nst.images):
                cand = x - step * ((x - t) + preset.lam * (x - d))
                losses.append(np.atleast_1d(problem.loss(scaled(cand).astype(np.float32))))
                count()
                choices.append((int(budget), step))
                cands.append(cand)
        pick = np.argmin(np.stack(losses), axis=0)          # per slice
        x = np.stack([cands[j][b] for b, j in enumerate(pick)])
        chosen = np.stack(losses)[pick, rows]
        for b, j in enumerate(pick):
            results[b].losses.append(float(chosen[b]))
            results[b].steps.append((choices[j][0], float(choices[j][1])))
        better = chosen < best_loss
        best_loss[better], best_x[better] = chosen[better], x[better]
    for b, r in enumerate(results):
        r.image = np.clip(best_x[b], 0.0, 1.0).astype(np.float32)
    return results


def evaluations_per_slice(preset: Preset) -> int:
    """What on_eval will count for one slice (for progress bars and time estimates)."""
    candidates = len(preset.budgets) * len(preset.step_multipliers)
    # scipy may evaluate once or twice past maxfun before stopping; close enough for progress.
    return preset.outer_iterations * (sum(preset.budgets) + candidates)


# Wall seconds per loss-and-gradient evaluation per megapixel of slice, VGG16 to conv4_1, on 2
# idle CPU cores: the CPU time of benchmarks/bench_rnst.py (24 CPU seconds) over 1.5 busy cores;
# the candidates' forward-only evaluations cost about a third of one. A loaded machine is slower.
CPU_SECONDS_PER_EVAL_MPIX = 16.0


# CPU seconds per megapixel of slice for each denoiser (one thread; measured on a 137 x 115
# MNI slice at noise 0.06 on this project's 2-core machine, rounded up).
DENOISER_SECONDS_PER_MPIX = {"nlm": 35.0, "nlm-2.5d": 10.0, "bm3d": 140.0}


def estimate_seconds(preset: Preset, slice_shape, n_slices: int) -> float:
    """Rough run time on 2 idle CPU cores (a GPU is much faster), denoiser included, for the
    panel and the CLI."""
    mpix = float(np.prod(slice_shape)) / 1e6
    evals = sum(preset.budgets) + len(preset.budgets) * len(preset.step_multipliers) / 3
    per_slice = (preset.outer_iterations * evals * CPU_SECONDS_PER_EVAL_MPIX
                 + DENOISER_SECONDS_PER_MPIX[preset.denoiser]) * mpix
    return n_slices * (per_slice + 1.0)
