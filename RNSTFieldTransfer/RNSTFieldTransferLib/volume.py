"""RNST over a volume, slice by slice in one of the three planes; image quality metrics.

Arrays are numpy (k, j, i) as SimpleITK and Slicer give them. The plane picks the array axis whose
direction is closest to S (axial), A (coronal) or R/L (sagittal), so oblique or flipped volumes
work. Content and style volumes are min-max scaled to [0, 1] as wholes (not per slice: a
per-slice scaling would change the contrast between slices); the output is mapped back to the
content's intensity range, and slices outside the range are copied from the input.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from .errors import RNSTCancelled, RNSTInputError

PLANES = ("axial", "coronal", "sagittal")


def slicing_axis(plane: str, direction=None) -> int:
    """numpy axis (of a (k, j, i) array) to step through for `plane`.

    `direction`: 3x3 IJK-to-LPS/RAS direction matrix (columns = i, j, k axes); identity if None.
    """
    if plane not in PLANES:
        raise RNSTInputError(f"unknown plane {plane!r}: choose axial, coronal or sagittal")
    world = {"sagittal": 0, "coronal": 1, "axial": 2}[plane]  # x (L-R), y (P-A), z (I-S)
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    image_axis = int(np.argmax(np.abs(d[world, :])))  # which of i, j, k runs along that world axis
    return 2 - image_axis  # numpy order is (k, j, i)


def parse_slices(text: str | None, n: int) -> range:
    """'A:B' (Python-style: A included, B excluded; either may be left out) -> range in [0, n)."""
    if text is None or text == "":
        return range(n)
    parts = text.split(":")
    if len(parts) != 2:
        raise RNSTInputError(f"--slices {text!r}: expected A:B, e.g. 40:44")
    try:
        a = int(parts[0]) if parts[0].strip() else 0
        b = int(parts[1]) if parts[1].strip() else n
    except ValueError:
        raise RNSTInputError(f"--slices {text!r}: A and B must be whole numbers") from None
    r = range(n)[a:b]
    if len(r) == 0:
        raise RNSTInputError(f"--slices {text!r} selects no slice (the volume has {n} slices "
                             f"along this plane, numbered 0 to {n - 1})")
    return r


def minmax(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    lo, hi = float(np.min(a)), float(np.max(a))
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def quality(image: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, SSIM) of `image` against `reference`, both min-max scaled, data range 1.

    2D images directly; a stack of 2D slices (first axis) gets PSNR over the stack and the mean
    2D SSIM of its slices (each slice has at least 7 pixels a side).
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    x, r = minmax(image), minmax(reference)
    psnr = float(peak_signal_noise_ratio(r, x, data_range=1.0))
    if x.ndim == 2:
        x, r = x[None], r[None]
    win = min(7, *x.shape[1:]) // 2 * 2 + 1 if min(x.shape[1:]) < 7 else 7
    ssim = float(np.mean([structural_similarity(rs, xs, data_range=1.0, win_size=win)
                          for xs, rs in zip(x, r)]))
    return psnr, ssim


@dataclass
class VolumeResult:
    output: np.ndarray                 # same shape and intensity range as the content
    axis: int
    slices: list
    losses: dict = field(default_factory=dict)  # slice -> chosen losses per iteration


def transfer_volume(content: np.ndarray, style: np.ndarray, *, preset, axis: int = 0,
                    slices: range | None = None, model=None, weights=None,
                    style_axis: int | None = None, progress=None,
                    cancel: threading.Event | None = None) -> VolumeResult:
    """RNST on each slice of `content` along numpy `axis` in `slices`.

    The style slice for content slice s is the one at the same relative position along the
    style volume's axis (a single-slice style volume serves all). `progress(fraction, text)` is
    called often; `cancel` is checked at every loss evaluation (raises RNSTCancelled).
    """
    from .nst import build_vgg16_features
    from .rnst import evaluations_per_slice, rnst_slice
    from .weights import load_vgg16_conv_weights

    content = np.asarray(content)
    style = np.asarray(style)
    shape = content.shape
    if content.ndim == 2:
        content = content[None]
    if style.ndim == 2:
        style, style_axis = style[None], 0
    style_axis = axis if style_axis is None else style_axis
    n = content.shape[axis]
    slices = range(n) if slices is None else slices
    if len(slices) == 0:
        raise RNSTInputError("the slice range selects no slice")
    lo, hi = float(content.min()), float(content.max())
    c01 = minmax(content).astype(np.float32)
    s01 = minmax(style).astype(np.float32)
    ns = s01.shape[style_axis]

    if model is None:
        model = build_vgg16_features(weights if weights is not None
                                     else load_vgg16_conv_weights())
    output = content.astype(np.float32).copy()  # slices outside the range stay bit-identical
    per_slice = evaluations_per_slice(preset)
    total = per_slice * len(slices)
    result = VolumeResult(output=content, axis=axis, slices=list(slices))
    for done, s in enumerate(slices):
        if cancel is not None and cancel.is_set():
            raise RNSTCancelled("cancelled")
        c2 = np.take(c01, s, axis=axis)
        js = 0 if ns == 1 else int(round(s / max(n - 1, 1) * (ns - 1)))
        st2 = np.take(s01, js, axis=style_axis)
        if float(c2.max() - c2.min()) < 1e-6:
            continue  # empty (background) slice: nothing to transfer

        def on_eval(k, done=done, s=s):
            if progress is not None:
                progress(min(1.0, (done * per_slice + k) / total),
                         f"slice {s} ({done + 1}/{len(slices)})")

        res = rnst_slice(c2, st2, model, preset, cancel=cancel, on_eval=on_eval)
        index = [slice(None)] * 3
        index[axis] = s
        output[tuple(index)] = res.image.astype(np.float64) * (hi - lo) + lo
        result.losses[int(s)] = res.losses
    if progress is not None:
        progress(1.0, "done")
    result.output = output.reshape(shape)
    return result


def slab(volume: np.ndarray, axis: int, slices) -> np.ndarray:
    """The processed slices as a stack (slice, rows, cols), for the metrics."""
    return np.moveaxis(np.take(np.asarray(volume), list(slices), axis=axis), axis, 0)
