"""RNST over a volume, slice by slice in one of the three planes; image quality metrics.

Each slice is transferred on its own, as in the paper; the denoiser that starts the style transfer
may look at the neighbouring slices ("nlm-2.5d"), and on a GPU several slices go through the
network together.

Arrays are numpy (k, j, i) as SimpleITK and Slicer give them. The plane picks the array axis whose
direction is closest to S (axial), A (coronal) or R/L (sagittal), so oblique or flipped volumes
work. Content and style volumes are min-max scaled to [0, 1] as wholes (not per slice: a
per-slice scaling would change the contrast between slices); the output is mapped back to the
content's intensity range, and slices outside the range are copied from the input. With the
volumes' geometry, each content slice gets the style slice at the nearest physical position, and
the style slice is resampled to the content's in-plane pixel size (Gram statistics depend on it).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import RNSTCancelled, RNSTInputError

PLANES = ("axial", "coronal", "sagittal")


class Geometry(NamedTuple):
    """Where a (k, j, i) array lies: origin, spacing (i, j, k) in mm, direction (3x3, columns i,
    j, k), all in one world frame (LPS for SimpleITK, RAS for Slicer: only differences count)."""
    origin: tuple = (0.0, 0.0, 0.0)
    spacing: tuple = (1.0, 1.0, 1.0)
    direction: tuple = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def style_slice_index(s: int, axis: int, content: Geometry, style_axis: int, style: Geometry,
                      n_style: int) -> int:
    """Index along `style_axis` of the style slice nearest in space to content slice `s`
    (positions projected on the style's slicing direction; clipped to the style volume)."""
    ci, si = 2 - axis, 2 - style_axis  # array axis -> i/j/k index
    dc = np.asarray(content.direction, float).reshape(3, 3)
    ds = np.asarray(style.direction, float).reshape(3, 3)
    point = np.asarray(content.origin, float) + dc[:, ci] * content.spacing[ci] * s
    along = float(ds[:, si] @ (point - np.asarray(style.origin, float)))
    return int(np.clip(round(along / style.spacing[si]), 0, n_style - 1))


def in_plane_spacing(geometry: Geometry, axis: int) -> tuple:
    """(row, column) pixel size in mm of slices along numpy `axis`."""
    sp = geometry.spacing[::-1]  # (k, j, i) order, like the array
    return tuple(float(sp[a]) for a in range(3) if a != axis)


def match_pixel_size(style2d: np.ndarray, style_mm: tuple, content_mm: tuple) -> np.ndarray:
    """Resample a style slice to the content's pixel size."""
    factors = [a / b for a, b in zip(style_mm, content_mm)]
    if np.allclose(factors, 1.0, rtol=1e-3):
        return style2d
    from skimage.transform import resize
    shape = tuple(max(8, int(round(n * f))) for n, f in zip(style2d.shape, factors))
    return resize(style2d, shape, order=1, anti_aliasing=min(factors) < 1,
                  preserve_range=True).astype(np.float32)


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


# The head, for the metrics: the reference above this fraction of its maximum (after a
# 1-pixel Gaussian smoothing), holes filled slice by slice. Over the whole slice, the background
# (a third of it or more) dominates SSIM: a plain histogram match to the style scores high there.
HEAD_THRESHOLD = 0.1


class Quality(NamedTuple):
    """PSNR (dB) and SSIM over the whole slice and inside the head (see quality())."""
    psnr: float
    ssim: float
    psnr_head: float
    ssim_head: float


def head_mask(reference: np.ndarray) -> np.ndarray:
    """Boolean mask of the head in a 2D slice or a stack of slices (first axis)."""
    from scipy import ndimage
    r = np.asarray(reference, np.float64)
    stack = r[None] if r.ndim == 2 else r
    smooth = np.stack([ndimage.gaussian_filter(s, 1.0) for s in stack])
    mask = np.stack([ndimage.binary_fill_holes(s > HEAD_THRESHOLD * stack.max()) for s in smooth])
    return mask[0] if r.ndim == 2 else mask


def quality(image: np.ndarray, reference: np.ndarray) -> Quality:
    """PSNR and SSIM of `image` against `reference`, both min-max scaled, data range 1: over the
    whole slice, and inside the head (head_mask of the reference: PSNR from the squared error
    there, SSIM the mean of the SSIM map there).

    2D images directly; a stack of 2D slices (first axis) gets PSNR over the stack and the 2D
    SSIM maps of its slices (each slice has at least 7 pixels a side).
    """
    from skimage.metrics import structural_similarity
    x, r = minmax(image), minmax(reference)
    if x.ndim == 2:
        x, r = x[None], r[None]
    mask = head_mask(r)
    win = min(7, *x.shape[1:]) // 2 * 2 + 1 if min(x.shape[1:]) < 7 else 7
    maps = np.stack([structural_similarity(rs, xs, data_range=1.0, win_size=win, full=True)[1]
                     for xs, rs in zip(x, r)])
    err = (x - r) ** 2

    def psnr(mse):
        return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))

    # skimage's SSIM is the mean of its map without the borders win // 2 wide; the same here.
    b = (win - 1) // 2
    inner = (slice(None), slice(b, -b or None), slice(b, -b or None))
    head = mask if mask.any() else np.ones_like(mask)
    return Quality(psnr(float(err.mean())), float(maps[inner].mean()),
                   psnr(float(err[head].mean())), float(maps[inner][head[inner]].mean()))


def through_plane_error(image: np.ndarray, reference: np.ndarray) -> float:
    """RMS difference, inside the head, between the slice-to-slice changes of `image` and of
    `reference` (stacks along the first axis, min-max scaled): how far neighbouring output
    slices disagree beyond what the anatomy does. Needs at least 2 slices."""
    x, r = minmax(image), minmax(reference)
    if x.ndim != 3 or x.shape[0] < 2:
        raise RNSTInputError("the through-plane error needs a stack of at least 2 slices")
    mask = head_mask(r)
    both = mask[1:] & mask[:-1]
    d = np.diff(x, axis=0) - np.diff(r, axis=0)
    return float(np.sqrt(np.mean(d[both] ** 2)))


@dataclass
class VolumeResult:
    output: np.ndarray                 # same shape and intensity range as the content
    axis: int
    slices: list
    losses: dict = field(default_factory=dict)  # slice -> chosen losses per iteration
    style_slices: dict = field(default_factory=dict)  # content slice -> style slice used


def transfer_volume(content: np.ndarray, style: np.ndarray, *, preset, axis: int = 0,
                    slices: range | None = None, model=None, backbone=None,
                    backbone_name: str = "vgg16", weights_path=None,
                    style_axis: int | None = None, content_geometry: Geometry | None = None,
                    style_geometry: Geometry | None = None, progress=None,
                    cancel: threading.Event | None = None,
                    batch: int | None = None) -> VolumeResult:
    """RNST on each slice of `content` along numpy `axis` in `slices`.

    The style slice for content slice s is the one nearest in space (from the geometries; without
    them both volumes are taken to share one grid), resampled to the content's pixel size; a
    single-slice style volume serves all. The denoiser sees the neighbouring content slices (also
    those outside `slices`). `model`/`backbone` from nst.build_model, else built from
    `backbone_name` and `weights_path`. `batch`: slices run together (default: a batch on a GPU,
    one at a time on a CPU). `progress(fraction, text)` is called often, the text with the
    remaining time and the device; `cancel` is checked at every loss evaluation (raises
    RNSTCancelled).
    """
    import time

    from .nst import build_model, compute_device, slices_per_batch
    from .rnst import evaluations_per_slice, rnst_slices

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
    c01 = minmax(content).astype(np.float32)
    s01 = minmax(style).astype(np.float32)
    ns = s01.shape[style_axis]
    cg, sg = content_geometry or Geometry(), style_geometry or Geometry()
    c_mm, s_mm = in_plane_spacing(cg, axis), in_plane_spacing(sg, style_axis)
    lo, hi = float(content.min()), float(content.max())

    if model is None:
        model, backbone = build_model(backbone_name, weights_path)
    device = compute_device()
    batch = batch or slices_per_batch()
    output = content.astype(np.float32).copy()  # slices outside the range stay bit-identical
    per_slice = evaluations_per_slice(preset)
    total = per_slice * len(slices)
    result = VolumeResult(output=content, axis=axis, slices=list(slices))
    todo = []
    for s in slices:
        js = 0 if ns == 1 else style_slice_index(s, axis, cg, style_axis, sg, ns)
        result.style_slices[int(s)] = js
        if float(np.ptp(np.take(c01, s, axis=axis))) >= 1e-6:
            todo.append(s)  # an empty (background) slice is left as it is
    t0 = time.monotonic()
    for first in range(0, len(todo), batch):
        if cancel is not None and cancel.is_set():
            raise RNSTCancelled("cancelled")
        group = todo[first:first + batch]
        c2 = [np.take(c01, s, axis=axis) for s in group]
        st2 = [match_pixel_size(np.take(s01, result.style_slices[int(s)], axis=style_axis),
                                s_mm, c_mm) for s in group]
        nb = [[np.take(c01, t, axis=axis) for t in (s - 1, s + 1) if 0 <= t < n] for s in group]

        def on_eval(k, first=first, group=group):
            if progress is None:
                return
            fraction = min(1.0, (first * per_slice + k * len(group)) / total)
            elapsed = time.monotonic() - t0
            left = "" if fraction < 0.02 else \
                f", about {_minutes(elapsed * (1 - fraction) / fraction)} left"
            which = f"slice {group[0]}" if len(group) == 1 else \
                f"slices {group[0]}..{group[-1]}"
            progress(fraction, f"{which} ({first + len(group)}/{len(todo)}){left}, {device}")

        for s, res in zip(group, rnst_slices(c2, st2, model, preset, backbone, cancel=cancel,
                                             on_eval=on_eval, neighbours=nb)):
            index = [slice(None)] * 3
            index[axis] = s
            output[tuple(index)] = res.image.astype(np.float64) * (hi - lo) + lo
            result.losses[int(s)] = res.losses
    if progress is not None:
        progress(1.0, "done")
    result.output = output.reshape(shape)
    return result


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def slab(volume: np.ndarray, axis: int, slices) -> np.ndarray:
    """The processed slices as a stack (slice, rows, cols), for the metrics."""
    return np.moveaxis(np.take(np.asarray(volume), list(slices), axis=axis), axis, 0)
