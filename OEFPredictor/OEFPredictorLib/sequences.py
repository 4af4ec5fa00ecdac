"""Voxels -> the paper's (5, 9) LSTM windows, and back.

The paper linearises the 3D volume into a 1D voxel list and feeds runs of consecutive voxels as a
'time' sequence. Here: the in-mask voxels in C order (z, y, x) form the list; each voxel has 9
features (8 echo magnitudes + QSM); the window around voxel i is voxels i-2..i+2 (target
'centre', the default) or i-4..i (target 'last'); indices past the ends repeat the end voxel
(edge padding). Windows are made per chunk of target voxels, never for a whole brain at once.

Input normalisation (stored in the model card, `input_normalisation`): echoes are divided by the
voxel's own echo-1 magnitude (scale-free: any scanner's units), QSM (ppm) is multiplied by
`qsm_scale`. S0 is learnt as S0 / S(TE1) and multiplied back, so it returns in the input's units.
"""
from __future__ import annotations

import numpy as np

WINDOW_LENGTH = 5
TARGETS = ("centre", "last")

DEFAULT_INPUT_NORMALISATION = {
    "echoes": "divide by the voxel's echo-1 magnitude",
    "qsm_scale": 10.0,  # ppm -> features of order 1
}


def window_offsets(length: int = WINDOW_LENGTH, target: str = "centre") -> np.ndarray:
    """Offsets of the window's voxels relative to the target voxel."""
    if length < 1:
        raise ValueError("Window length must be at least 1.")
    if target == "centre":
        half = length // 2
        return np.arange(-half, length - half)
    if target == "last":
        return np.arange(-(length - 1), 1)
    raise ValueError(f"Window target must be one of {TARGETS}, got {target!r}.")


def voxel_features(echoes: np.ndarray, qsm: np.ndarray, qsm_scale: float = 10.0):
    """Per-voxel features (N, E + 1) and the echo-1 scale (N,) of in-mask voxel rows.

    echoes: (N, E) magnitudes; qsm: (N,) ppm. Voxels with echo 1 <= 0 get NaN features: the caller
    decides what to do with them (the engine masks them out with a warning).
    """
    echoes = np.asarray(echoes, dtype=np.float32)
    scale = echoes[:, 0].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = echoes / np.where(scale > 0, scale, np.nan)[:, None]
    features = np.concatenate([normalised, (np.asarray(qsm, dtype=np.float32) * qsm_scale)[:, None]], axis=1)
    return features.astype(np.float32), scale


def make_windows(features: np.ndarray, start: int, stop: int, length: int = WINDOW_LENGTH,
                 target: str = "centre") -> np.ndarray:
    """Windows (stop - start, length, F) for target voxels start..stop-1 of the voxel list."""
    n = len(features)
    if not 0 <= start <= stop <= n:
        raise ValueError(f"Window range {start}:{stop} is outside the {n} voxels.")
    idx = np.arange(start, stop)[:, None] + window_offsets(length, target)[None, :]
    np.clip(idx, 0, n - 1, out=idx)  # edge padding
    return features[idx]


def windows_for(features: np.ndarray, targets: np.ndarray, length: int = WINDOW_LENGTH,
                target: str = "centre") -> np.ndarray:
    """Windows for an arbitrary set of target voxel positions (e.g. a training subsample)."""
    idx = np.asarray(targets)[:, None] + window_offsets(length, target)[None, :]
    np.clip(idx, 0, len(features) - 1, out=idx)
    return features[idx]


def iter_chunks(n: int, chunk: int):
    """(start, stop) pairs covering 0..n in steps of `chunk`."""
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)
