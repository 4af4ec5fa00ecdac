"""Cheap plausibility checks of prediction inputs and results: mistakes that give a map without
an error message unless someone looks.

check_inputs (called by predict.PredictionInputs.validate, before any prediction) refuses, with
what is wrong and what to do:
- a QSM in ppb instead of ppm (median |QSM| in the brain above 1 ppm: brain tissue lies within
  about +-0.2 ppm, the same data in ppb around 10-200);
- an all-zero or constant QSM;
- echoes clipped when stored (more than 1 % of the brain's first-echo voxels at the echoes' very
  largest value: e.g. floats cast to 16-bit integers without rescaling; valid data reach their
  maximum in a few voxels at most);
- echoes whose signal does not decay (reversed order), or whose brain median rises from one echo
  to the next by more than 2 % (shuffled order): a GRE magnitude decays with echo time, by about
  10 % per 5 ms in brain tissue, and the median over thousands of voxels is not moved by noise.

check_mask (called by check_inputs when a mask is given) warns when the mask holds many voxels
that are not brain: where the QSM is exactly 0 or undefined (a QSM pipeline has already masked the
brain and set the rest so), with no tissue signal on echo 1 (under a tenth of the mask's median:
skull, air, background), or with a decay no brain tissue has (an apparent R2* above
MAX_TISSUE_R2_HZ between the first and last echo: bone, air-tissue interfaces). Such voxels bias
the OEF of the whole brain (the spatial models normalise over the mask), most at its edge.

check_fit (called by predict.predict_maps on the quality map) warns when the median normalised
model residual is far above the noise level of usable data (quality ~ 1/SNR where the model
explains the data: 0.01 at SNR 100, 0.04 at SNR 20): above MAX_MEDIAN_QUALITY the data do not fit
the QQ model, or are too noisy for a map (it fires from about SNR 5 down).

The thresholds sit far from valid data: Testing/test_reliability.py checks that none fires on
every simulated patient at SNR 20 to 200 and without noise.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

MAX_MEDIAN_ABS_QSM_PPM = 1.0  # above: the QSM is in ppb (or another unit)
MAX_ECHO_RISE = 1.02  # brain-median signal of echo j+1 over echo j; above: echoes out of order
MAX_CLIPPED_FRACTION = 0.01  # of the brain's first-echo voxels at the echoes' largest value; above: clipped
MAX_MEDIAN_QUALITY = 0.15  # median normalised residual; ~1/SNR on valid data
MAX_NON_BRAIN_FRACTION = 0.01  # of the mask's voxels that look like non-brain tissue; above: a warning
MIN_TISSUE_SIGNAL = 0.1  # echo 1 over the mask's median echo 1; below: no tissue signal
MAX_TISSUE_R2_HZ = 300.0  # apparent R2* (first to last echo); brain tissue and veins stay far below at 3-7 T
MIN_VOXELS = 50  # fewer tissue voxels than this: too few to judge, no check
SAMPLE_VOXELS = 200_000  # a regular subsample keeps the checks cheap on 1 mm brains


def tissue_sample(echoes: np.ndarray, qsm: np.ndarray, mask: np.ndarray | None = None):
    """(echo rows (N, E), QSM values (N,)) of up to SAMPLE_VOXELS finite tissue voxels: the mask's,
    or without one, the voxels brighter on echo 1 than a fifth of its 99th percentile (tissue,
    not background)."""
    echo1 = echoes[..., 0]
    with np.errstate(invalid="ignore"):
        if mask is not None:
            region = np.asarray(mask, bool) & np.isfinite(qsm) & np.isfinite(echo1)
        else:
            positive = echo1[np.isfinite(echo1) & (echo1 > 0)]
            if positive.size == 0:
                return echoes.reshape(-1, echoes.shape[-1])[:0], qsm.reshape(-1)[:0]
            region = np.isfinite(qsm) & (echo1 > 0.2 * np.percentile(positive, 99))
    idx = np.flatnonzero(region)
    if idx.size > SAMPLE_VOXELS:
        idx = idx[:: -(-idx.size // SAMPLE_VOXELS)]
    rows = echoes.reshape(-1, echoes.shape[-1])[idx].astype(np.float64)
    q = qsm.reshape(-1)[idx].astype(np.float64)
    keep = np.all(np.isfinite(rows), axis=1) & (rows[:, 0] > 0)
    return rows[keep], q[keep]


def check_inputs(echoes: np.ndarray, qsm: np.ndarray, mask: np.ndarray | None, echo_times_ms) -> list[str]:
    """Raise InputError for implausible inputs (see the module doc); return warnings (check_mask's)."""
    rows, q = tissue_sample(np.asarray(echoes), np.asarray(qsm), mask)
    if len(q) < MIN_VOXELS:
        return []
    if not np.any(q):
        raise InputError("The QSM is 0 everywhere in the brain: it is not a susceptibility map (an empty "
                         "or failed reconstruction?). Give the QSM in ppm.")
    if np.ptp(q) == 0:
        raise InputError(f"The QSM has the same value ({q[0]:g}) everywhere in the brain: it is not a "
                         "susceptibility map. Give the QSM in ppm.")
    median_abs = float(np.median(np.abs(q)))
    if median_abs > MAX_MEDIAN_ABS_QSM_PPM:
        raise InputError(f"The QSM looks like ppb, not ppm: its median magnitude in the brain is {median_abs:.3g}, "
                         "while brain tissue lies within about +-0.2 ppm. Divide it by 1000 (ppb -> ppm).")
    te = [f"{t:g} ms" for t in echo_times_ms]
    ceiling = float(np.nanmax(echoes))
    clipped = float(np.mean(rows[:, 0] == ceiling))
    if clipped > MAX_CLIPPED_FRACTION:
        raise InputError(f"The echoes look clipped: {100 * clipped:.0f} % of the brain's voxels on the first echo "
                         f"({te[0]}) sit at the echoes' largest value, {ceiling:.6g}, so their signal and decay are "
                         "lost. Store the echoes again without clipping (as floats, or scaled to fit the integer "
                         "type).")
    medians = np.median(rows, axis=0)
    if medians[-1] >= medians[0]:
        raise InputError(f"The echo signal does not decay: in the brain the last echo ({te[-1]}) is as bright as "
                         f"or brighter than the first ({te[0]}), median {medians[-1]:.4g} vs {medians[0]:.4g}. "
                         "The echoes look reversed; give them in increasing echo time.")
    rises = np.flatnonzero(medians[1:] > MAX_ECHO_RISE * medians[:-1])
    if rises.size:
        j = int(rises[0])
        raise InputError(f"Echo {j + 2} ({te[j + 1]}) is brighter than echo {j + 1} ({te[j]}) in the brain (median "
                         f"{medians[j + 1]:.4g} vs {medians[j]:.4g}), but a gradient echo decays with echo time: the "
                         "echoes look shuffled. Give them in increasing echo time, with matching echo times.")
    return [] if mask is None else check_mask(echoes, qsm, mask, list(echo_times_ms))


def check_mask(echoes: np.ndarray, qsm: np.ndarray, mask: np.ndarray, echo_times_ms) -> list[str]:
    """A warning naming the non-brain voxels inside a given mask (see the module doc), or []."""
    inside = np.asarray(mask, bool)
    n_mask = int(np.count_nonzero(inside))
    if n_mask < MIN_VOXELS:
        return []
    q = np.asarray(qsm)[inside]
    first = np.asarray(echoes[..., 0])[inside].astype(np.float64)
    last = np.asarray(echoes[..., -1])[inside].astype(np.float64)
    no_qsm = ~np.isfinite(q) | (q == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        reference = np.median(first[np.isfinite(first) & (first > 0)]) if np.any(first > 0) else 0.0
        no_signal = ~(first >= MIN_TISSUE_SIGNAL * reference)
        span_s = (echo_times_ms[-1] - echo_times_ms[0]) / 1000.0
        r2 = np.log(first / last) / span_s if span_s > 0 else np.zeros_like(first)
        fast = ~no_signal & (r2 > MAX_TISSUE_R2_HZ)
    non_brain = no_qsm | no_signal | fast
    n = int(np.count_nonzero(non_brain))
    if n <= MAX_NON_BRAIN_FRACTION * n_mask:
        return []
    signs = [f"{int(np.count_nonzero(a))} where {what}" for a, what in (
        (no_qsm, "the QSM is exactly 0 or undefined (outside the QSM pipeline's brain)"),
        (no_signal & ~no_qsm, f"echo 1 has no tissue signal (under {MIN_TISSUE_SIGNAL:g} of the mask's median)"),
        (fast & ~no_qsm, f"the signal decays faster than any brain tissue (R2* above {MAX_TISSUE_R2_HZ:g} Hz)"))
        if np.any(a)]
    return [f"The mask includes non-brain tissue (skull, scalp or background?): {n} of its {n_mask} voxels "
            f"({100.0 * n / n_mask:.1f} %) do not look like brain: {'; '.join(signs)}. They bias the OEF of the "
            "whole brain; give the brain mask of the QSM pipeline, or leave the mask out to use where the QSM "
            "is defined."]


def check_fit(quality: np.ndarray) -> list[str]:
    """A warning when the median quality (normalised model residual) of the predicted voxels is far
    above the noise level."""
    q = np.asarray(quality, dtype=np.float64)
    q = q[np.isfinite(q)]
    if q.size < MIN_VOXELS:
        return []
    median = float(np.median(q))
    if median <= MAX_MEDIAN_QUALITY:
        return []
    return [f"The data do not fit the model: the median quality (normalised residual) is {median:.3g}, far above "
            "the noise level of usable data (about 1/SNR: 0.01 at SNR 100). The data are very noisy, or not what "
            "the model describes: check the echo times and their order, the field strength, that the echoes are "
            "magnitudes and the QSM is in ppm. The maps are not reliable."]
