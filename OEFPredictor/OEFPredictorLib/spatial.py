"""The spatial models: networks that map whole volumes of the 9 QQ inputs to the QQ parameters and a
90 % interval of OEF.

Why spatial: Y and v separate only weakly voxel by voxel (physics.md), so a voxelwise learner shrinks
to its training prior and a lesion's contrast is lost. A spatial network pools the evidence of
neighbouring voxels, as QQ-NET (Cho et al., MRM 2022) does. Two architectures (models.py):

- context (the default method): a fixed multi-scale pyramid of the inputs, then a learned network
  per voxel. The pyramid: the log echo ratios log(S_j / S_1) (j = 2..8) and QSM, each averaged inside
  the brain mask with Gaussians of `sigmas_mm` (mask-normalised, so the brain's edge is not mixed
  with the background), next to the voxel's own values. A voxel thus sees its neighbourhood at 2, 4
  and 8 mm, and a lesion's signal is pooled before the network splits it into Y and v. It trains on
  whole virtual patients in half an hour on a 2-core CPU;
- unet (experimental): a 3D U-Net in the QQ-NET family, learned end to end. On two CPU cores it did
  not learn lesions in an hour (README).

Inputs (the model card's `input_normalisation`): per voxel the 8 echo magnitudes divided by the
voxel's echo-1 magnitude and QSM (ppm) x 10, 0 outside the brain mask; the volume is resampled to the
model's voxel size (2 mm, `spatial.voxel_size_mm` in the card) by mask-normalised averaging (whole
blocks when the factor is a whole number, e.g. 1 mm data; else Gaussian smoothing), and the maps are
interpolated back to the input grid at the mask's voxels.

Outputs per voxel: the 5 z-scored QQ parameters (as the LSTM's), and two raw interval channels:
OEF_p05 = OEF - k softplus(a) * 10 pp, OEF_p95 = OEF + k softplus(b) * 10 pp, trained with the
pinball loss at 5 % and 95 % and widened by the factor k (`spatial.interval_scale`) that split
conformal calibration on held-out patients gives.

The map's contrast about the brain's median OEF is then scaled by a gain that depends on the volume's
measured noise (`spatial.contrast_gain` in the card, fitted on the calibration patients; contrast_gain):
the network was trained on a wide prior, so in noisy data it keeps too much of what is noise (the gain is
below 1 there: the map leans on the brain's own typical value, not on a population's), and in clean data
it shrinks real contrast (above 1). The interval is calibrated on the map after the gain.

Memory stays bounded for any input size: the context model's network, which maps each voxel's features
alone, runs in fixed-size chunks of the voxels whose values are read back (run_pointwise); the U-Net runs
tile by tile (overlapping tiles blended with a linear ramp) when the brain's box exceeds the tile size.
"""
from __future__ import annotations

import numpy as np

from . import physics

VOXEL_SIZE_MM = 2.0  # the grid the spatial model works on
INTERVAL_QUANTILES = (0.05, 0.95)
INTERVAL_UNIT = 0.1  # the interval channels are in units of 10 percentage points of OEF
N_OUTPUTS = len(physics.PARAMETER_NAMES) + 2
# Loss weights per parameter (S0, R2, Y, v, chi_nb): Y carries OEF, the product's map.
PARAMETER_LOSS_WEIGHTS = (0.5, 0.5, 2.0, 1.0, 0.5)
TILE_VOXELS = 64  # U-Net tile edge (model grid) for volumes whose brain box is larger; ~0.3 GiB of activations
TILE_OVERLAP = 16
POINTWISE_CHUNK = 65536  # voxels per network call for a voxel-by-voxel model (the context model): ~0.1 GiB
SLAB_BLOCKS = 8  # model voxels per z slab when averaging blocks: bounds the data-grid feature temporaries
# Inputs are clipped to what tissue can give (echo ratios decay from 1; QSM within +-0.5 ppm), so a
# stray voxel (vessel, artefact, bad mask edge) cannot dominate its neighbourhood in the network.
ECHO_RATIO_RANGE = (0.0, 1.5)
# Below this contrast gain the output says that the map was drawn towards the brain's median (noisy data).
CONTRAST_GAIN_NOTICE = 0.9
QSM_RANGE_PPM = (-0.5, 0.5)
# The context model's local-noise channels: of the base channels, the last echo ratio and QSM.
LOCAL_NOISE_CHANNELS = (-2, -1)


def divisor(spec: dict) -> int:
    """Volume edges must be multiples of this (one halving per pooling level of a U-Net)."""
    return 2 ** (len(spec["filters"]) - 1) if spec.get("architecture") == "unet" else 1


def context_feature_count(spec: dict, n_echoes: int = 8) -> int:
    """Channels per voxel of the context model's inputs (network_inputs): the base channels at each scale,
    the local-noise channels and, for protocol-free models, the protocol descriptors."""
    from . import decay

    n_base = (len(decay.CANONICAL_MS) if spec.get("decay") else n_echoes - 1) + 1
    return (n_base * (1 + len(spec["sigmas_mm"])) + (len(LOCAL_NOISE_CHANNELS) if spec.get("local_noise") else 0)
            + (decay.N_DESCRIPTORS if spec.get("decay") else 0))


# --- Inputs -----------------------------------------------------------------------------------
def volume_features(echoes: np.ndarray, qsm: np.ndarray, mask: np.ndarray, qsm_scale: float,
                    qsm_reference: float = 0.0) -> np.ndarray:
    """(z, y, x, E + 1) float32 network inputs: echoes / echo 1 and (QSM - qsm_reference) x qsm_scale
    inside the mask."""
    def f32(a):
        return a.astype(np.float32, copy=False)

    echo1 = echoes[..., 0]
    with np.errstate(invalid="ignore"):  # NaN/Inf outside the mask are not used
        inside = mask & (echo1 > 0)
        features = np.zeros(echoes.shape[:3] + (echoes.shape[3] + 1,), dtype=np.float32)
        scale = f32(np.where(inside, echo1, 1.0))
        for e in range(echoes.shape[3]):
            features[..., e] = np.where(inside, np.clip(f32(echoes[..., e]) / scale, *ECHO_RATIO_RANGE), 0.0)
        qsm = f32(qsm) - np.float32(qsm_reference)
        features[..., -1] = np.where(inside, np.clip(qsm, *QSM_RANGE_PPM) * qsm_scale, 0.0)
    return features


def base_channels(features: np.ndarray, spec: dict, protocol: physics.Protocol | None = None) -> np.ndarray:
    """The per-voxel channels the context pyramid is built of, from volume_features (E echo ratios, QSM).

    Protocol-free models (the card's spec has "decay"): the decay curve at the canonical 3 T-equivalent
    times (decay.canonical_matrix), then QSM. Older context models: log(S_j / S_1) for echoes 2..E, QSM."""
    from . import decay

    n_echo = features.shape[-1] - 1
    log_ratios = np.log(np.clip(features[..., :n_echo], 1e-3, None))
    if spec.get("decay"):
        if protocol is None:
            raise ValueError("a protocol-free model needs the data's protocol")
        decay.check_spec(spec["decay"])
        w = decay.canonical_matrix(protocol)
        curve = np.tensordot(log_ratios, w.T, axes=(-1, 0))
    else:
        curve = log_ratios[..., 1:]
    return np.concatenate([curve.astype(np.float32), features[..., n_echo:]], axis=-1)


def context_features(base: np.ndarray, mask: np.ndarray, sigmas_vox, local_noise: bool = False,
                     descriptors=None) -> np.ndarray:
    """The context model's inputs: (z, y, x, C (1 + len(sigmas)) [+ 2] [+ D]) float32 from base_channels.

    The C base channels; then the same channels averaged inside the mask with a Gaussian of each sigma
    (voxels), mask-normalised (mode "constant": the values do not depend on how much background
    surrounds the brain). With `local_noise`, two more: the log of the local RMS of the fine-scale
    residual (the channel minus its first-sigma average) of the last decay channel and of QSM, averaged
    over the largest sigma. They tell the network how far to trust the finer scales where the signal is
    low, so noise is not read as a lesion. `descriptors` (D numbers, the acquisition) are appended to
    every voxel. 0 outside the mask.
    """
    from scipy import ndimage

    base = base * mask[..., None]
    n_base = base.shape[-1]
    descriptors = np.zeros(0, np.float32) if descriptors is None else np.asarray(descriptors, np.float32)
    n_out = n_base * (1 + len(sigmas_vox)) + (len(LOCAL_NOISE_CHANNELS) if local_noise else 0) + len(descriptors)
    out = np.zeros(base.shape[:3] + (n_out,), dtype=np.float32)
    out[..., :n_base] = base
    m = mask.astype(np.float32)

    weights = {}  # the smoothed mask, once per sigma

    def average(values, sigma):  # inside the mask only
        if sigma not in weights:
            weights[sigma] = np.maximum(ndimage.gaussian_filter(m, sigma, mode="constant"), 1e-3)
        return ndimage.gaussian_filter(values * m, sigma, mode="constant") / weights[sigma]

    for k, sigma in enumerate(sigmas_vox, start=1):
        for c in range(n_base):
            out[..., k * n_base + c] = average(base[..., c], sigma)
    start = n_base * (1 + len(sigmas_vox))
    if local_noise:
        for k, c in enumerate(c % n_base for c in LOCAL_NOISE_CHANNELS):
            residual = base[..., c] - out[..., n_base + c]  # the channel minus its first-sigma average
            out[..., start + k] = 0.5 * np.log(average(residual ** 2, sigmas_vox[-1]) + 1e-8)
        start += len(LOCAL_NOISE_CHANNELS)
    out[..., start:] = descriptors
    out *= mask[..., None]
    return out


def network_inputs(features: np.ndarray, mask: np.ndarray, spec: dict, voxel_size_mm: float,
                   protocol: physics.Protocol | None = None) -> np.ndarray:
    """volume_features on the model grid -> what the network of `spec` (the card's "model") takes;
    training calls this too, so the context model learns on exactly what inference gives it."""
    from . import decay

    if not spec.get("sigmas_mm"):
        return features
    descriptors = decay.protocol_descriptors(protocol) if spec.get("decay") else None
    return context_features(base_channels(features, spec, protocol), mask,
                            [s / voxel_size_mm for s in spec["sigmas_mm"]], bool(spec.get("local_noise")),
                            descriptors)


# --- Loss (training) ----------------------------------------------------------------------------
def make_loss(output_scaling: dict, per_voxel: bool = False):
    """Masked Huber loss on the z-scored parameters plus the pinball loss of the OEF interval.

    Patches (U-Net): the weighted mean over each patch's voxels. Voxels (`per_voxel`, batches of
    (N, 1, 1, 1, C)): each voxel's loss times its weight.

    y_true channels: 5 z-scored targets, true OEF (fraction), voxel weight (1 in the metric mask).
    y_pred channels: 5 z-scored parameters, 2 raw interval channels. The interval terms do not push
    on the point estimate (stop-gradient): the interval describes the estimate, it does not bend it.
    """
    from keras import ops

    y_index = physics.PARAMETER_NAMES.index("Y")
    y_mean, y_std = output_scaling["mean"][y_index], output_scaling["std"][y_index]
    weights = ops.convert_to_tensor(np.array(PARAMETER_LOSS_WEIGHTS, dtype=np.float32))
    q_lo, q_hi = INTERVAL_QUANTILES

    def pinball(q, error):
        return ops.maximum(q * error, (q - 1.0) * error)

    def qq_interval_loss(y_true, y_pred):
        n = len(physics.PARAMETER_NAMES)
        w = y_true[..., n + 1]
        err = y_pred[..., :n] - y_true[..., :n]
        abs_err = ops.abs(err)
        huber = ops.where(abs_err <= 1.0, 0.5 * err * err, abs_err - 0.5)
        parameter_term = ops.sum(huber * weights, axis=-1)
        oef_hat = ops.stop_gradient(1.0 - (y_pred[..., y_index] * y_std + y_mean) / physics.YA)
        lo = oef_hat - ops.softplus(y_pred[..., n]) * INTERVAL_UNIT
        hi = oef_hat + ops.softplus(y_pred[..., n + 1]) * INTERVAL_UNIT
        oef_true = y_true[..., n]
        interval_term = (pinball(q_lo, oef_true - lo) + pinball(q_hi, oef_true - hi)) / INTERVAL_UNIT
        total = ops.sum(w * (parameter_term + interval_term), axis=(1, 2, 3))
        return total if per_voxel else total / (ops.sum(w, axis=(1, 2, 3)) + 1.0)

    return qq_interval_loss


# --- Outputs ------------------------------------------------------------------------------------
def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def decode(raw: np.ndarray, echo1: np.ndarray, output_scaling: dict, interval_scale=1.0,
           r2_factor: float = 1.0, noise_level: float | None = None, resampling=None, gain: float = 1.0) -> dict:
    """(N, 7) network outputs of in-mask voxels -> clamped parameters, OEF and its interval (percent).

    `r2_factor`: real-time R2 per predicted R2 (B0 / 3 for protocol-free models, which predict R2 in
    3 T-equivalent time). `interval_scale`: the conformal factor(s), see interval_factors; the voxels are
    one volume's brain (the abnormality is relative to its median) of noise level `noise_level`
    (decay.noise_level), whose decay reached the model's echo times by `resampling` (decay.Resampling; None:
    measured at them). `gain`: the contrast gain about the brain's median OEF (contrast_gain)."""
    from . import models

    n = len(physics.PARAMETER_NAMES)
    params = models.decode_outputs(raw[:, :n], echo1, output_scaling)
    params["R2"] = params["R2"] * r2_factor
    params = physics.clamp_to_bounds(params, s0_scale=echo1)
    oef = 100.0 * physics.oef_from_Y(params["Y"])
    centre = float(np.median(oef)) if oef.size else 0.0  # the gain keeps it: the interval's bins read it too
    if gain != 1.0 and oef.size:
        params["Y"] = np.clip(physics.Y_from_oef(apply_gain(oef, gain, centre) / 100.0), *physics.BOUNDS["Y"])
        oef = 100.0 * physics.oef_from_Y(params["Y"])
    half_below = softplus(raw[:, n]) * INTERVAL_UNIT * 100.0
    half_above = softplus(raw[:, n + 1]) * INTERVAL_UNIT * 100.0
    k = interval_factors(interval_scale, half_below, half_above, oef, noise_level, resampling, centre)
    out = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    out["OEF"] = oef.astype(np.float32)
    out["OEF_p05"] = np.clip(oef - k * half_below, 0.0, 100.0).astype(np.float32)
    out["OEF_p95"] = np.clip(oef + k * half_above, 0.0, 100.0).astype(np.float32)
    out["OEF_width"] = (out["OEF_p95"] - out["OEF_p05"]).astype(np.float32)
    return out


def apply_gain(oef: np.ndarray, gain: float, centre: float) -> np.ndarray:
    """OEF (pp) with its contrast about `centre` (the brain's median) scaled by `gain`."""
    return centre + gain * (oef - centre)


def contrast_gain(fit: dict | None, noise_level: float | None) -> float:
    """The gain on the map's contrast for a volume of noise level `noise_level` (decay.noise_level): the card's
    line {"intercept", "slope"} in the noise level, which is held within the calibration volumes' range
    ("noise_levels"), and never below 0. A shrink (a gain below 1) is made smaller by the card's
    "smallest_shrink": near 1 a shrink buys almost no RMSE (it is quadratic about its optimum) but costs a
    lesion its contrast in proportion. 1 without a fit, or where the noise level is unknown (an empty mask)."""
    if fit is None or noise_level is None or not np.isfinite(noise_level):
        return 1.0
    level = float(np.clip(noise_level, *fit["noise_levels"]))
    gain = fit["intercept"] + fit["slope"] * level
    if gain < 1.0:
        gain = 1.0 - max(0.0, 1.0 - gain - fit.get("smallest_shrink", 0.0))
    return max(0.0, gain)


def interval_factors(interval_scale, half_below: np.ndarray, half_above: np.ndarray, oef: np.ndarray,
                     noise_level: float | None = None, resampling=None, centre: float | None = None):
    """The conformal factor of each voxel's interval: one number for all, or Mondrian (a card's
    {"width_edges_pp", "abnormality_edges_pp", "factors"}): voxels are calibrated among those of the same
    bin of the network's own half-width and of predicted abnormality (|OEF - the brain's median OEF|),
    so the interval is right where the network is unsure, and where it sees a lesion, not only on
    average. With "noise" ({"intercept", "slope"} and the resampling terms) the factors are relative to the
    volume's scale (noise_scale), because the network's own half-width does not grow enough with the noise
    or with the error of resampling another echo train. `centre`: the brain's median OEF (from `oef` when not
    given)."""
    if not isinstance(interval_scale, dict):
        return float(interval_scale)
    factors = np.asarray(interval_scale["factors"], dtype=np.float32)  # (abnormality bins, width bins)
    width = np.searchsorted(np.asarray(interval_scale["width_edges_pp"]), 0.5 * (half_below + half_above))
    if centre is None:
        centre = float(np.median(oef)) if oef.size else 0.0
    abnormal = np.searchsorted(np.asarray(interval_scale["abnormality_edges_pp"]), np.abs(oef - centre))
    return factors[abnormal, width] * noise_scale(interval_scale, noise_level, resampling)


def noise_scale(interval_scale: dict, noise_level: float | None, resampling=None) -> float:
    """The interval's scale for a volume: 10^(intercept + slope x its noise level (decay.noise_level) + curvature
    x (its noise level - the middle of the calibration's range "noise_levels")^2 + each resampling term x the
    volume's value of it (decay.Resampling.covariates: "resampled" where its decay was
    resampled from another echo train, "extrapolated_per_ms" x how far it was continued beyond the echoes,
    "wider_gap_per_ms" x how much wider its widest echo gap is than the model's)); 1 without a "noise" entry.
    A card without a term (calibrated before it) leaves it out."""
    noise = interval_scale.get("noise")
    if noise is None:
        return 1.0
    if noise_level is None or not np.isfinite(noise_level):
        raise ValueError("these interval factors need the volume's noise level")
    from . import decay

    terms = (resampling or decay.Resampling()).covariates()
    curve = 0.0
    if "curvature" in noise:  # held within the calibration's range, where a parabola was fitted
        lo, hi = noise["noise_levels"]
        curve = noise["curvature"] * (float(np.clip(noise_level, lo, hi)) - 0.5 * (lo + hi)) ** 2
    return float(10.0 ** (noise["intercept"] + noise["slope"] * noise_level + curve
                          + sum(noise.get(name, 0.0) * value for name, value in terms.items())))


# --- Resampling between the data's grid and the model's -----------------------------------------
def resampling_factors(spacing_zyx, model_mm: float) -> np.ndarray:
    """Model voxel size / data voxel size per axis; 1 where they agree within 5 %."""
    f = model_mm / np.asarray(spacing_zyx, dtype=float)
    return np.where(np.abs(f - 1.0) < 0.05, 1.0, f)


def block_factors(factors) -> tuple[int, ...] | None:
    """The factors as whole numbers of data voxels per model voxel (1 mm -> 2 mm: 2), or None."""
    k = np.round(np.asarray(factors, dtype=float))
    if np.all(k >= 1) and np.all(np.abs(np.asarray(factors) - k) < 0.01):
        return tuple(int(v) for v in k)
    return None


def _grid_shape(shape, factors) -> tuple[int, ...]:
    k = block_factors(factors)
    if k is not None:  # whole blocks; the last one may reach past the volume's edge
        return tuple(-(-n // f) for n, f in zip(shape, k))
    return tuple(max(1, int(round(n / f))) for n, f in zip(shape, factors))


def _grid_scales(shape, grid_shape, factors) -> tuple[float, ...]:
    """Data voxels per model voxel on each axis: exactly the factor for blocks, else stretched so that
    the two grids have the same extent."""
    k = block_factors(factors)
    return tuple(float(f) for f in k) if k is not None else tuple(n / g for n, g in zip(shape, grid_shape))


def to_model_grid(channels: np.ndarray, mask: np.ndarray, factors) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x, C) data-grid channels -> the model grid, averaging inside the mask only (a border
    voxel is not mixed with the background); returns (channels, mask) on the model grid.

    Whole-number factors (1 mm -> 2 mm) average each block of data voxels: exact, and far cheaper than
    smoothing and interpolating. Other factors smooth with a Gaussian of the block's variance."""
    if np.all(np.asarray(factors) == 1.0):
        return channels, mask
    k = block_factors(factors)
    if k is not None:
        return _block_average(channels, mask, k)
    return _smooth_resample(channels, mask, factors)


def _block_average(channels: np.ndarray, mask: np.ndarray, k) -> tuple[np.ndarray, np.ndarray]:
    out_shape = _grid_shape(mask.shape, k)
    padded = tuple(g * f for g, f in zip(out_shape, k))

    def block_sum(volume):  # zero-padded to whole blocks, summed per block, one axis at a time
        buf = np.zeros(padded, dtype=np.float32)
        buf[:volume.shape[0], :volume.shape[1], :volume.shape[2]] = volume
        for axis, f in enumerate(k):
            buf = sum(buf[(slice(None),) * axis + (slice(i, None, f),)] for i in range(f))
        return buf

    m = mask.astype(np.float32)
    m_sum = block_sum(m)
    # a model voxel is brain when at least half its block is (as interpolating the mask at its centre says)
    grid_mask = m_sum >= 0.5 * np.prod(k)
    out = np.zeros(out_shape + (channels.shape[-1],), dtype=np.float32)
    for c in range(channels.shape[-1]):
        out[..., c] = block_sum(np.where(mask, channels[..., c], 0.0)) / np.maximum(m_sum, 1e-6)
    out[~grid_mask] = 0.0
    return out, grid_mask


def _smooth_resample(channels: np.ndarray, mask: np.ndarray, factors) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    out_shape = _grid_shape(mask.shape, factors)
    coords = _sample_coordinates(mask.shape, out_shape)
    # a box of `factor` voxels has the variance of a Gaussian of sigma factor / sqrt(12)
    sigma = np.sqrt(np.maximum(np.asarray(factors) ** 2 - 1.0, 0.0) / 12.0)
    m = mask.astype(np.float32)
    m_smooth = ndimage.gaussian_filter(m, sigma) if np.any(sigma > 0) else m
    m_grid = ndimage.map_coordinates(m_smooth, coords, order=1)
    out = np.zeros(out_shape + (channels.shape[-1],), dtype=np.float32)
    for c in range(channels.shape[-1]):
        v = channels[..., c] * m
        if np.any(sigma > 0):
            v = ndimage.gaussian_filter(v, sigma)
        out[..., c] = ndimage.map_coordinates(v, coords, order=1) / np.maximum(m_grid, 1e-6)
    grid_mask = ndimage.map_coordinates(m, coords, order=1) >= 0.5
    out[~grid_mask] = 0.0
    return out, grid_mask


def from_model_grid(values: np.ndarray, grid_mask: np.ndarray, mask: np.ndarray, factors=None) -> np.ndarray:
    """(z', y', x', C) model-grid maps -> (N, C) values at the data grid's mask voxels (C order), linear
    and mask-normalised so the brain's edge keeps its values. `factors`: those given to to_model_grid
    (None: the two grids have the same extent).

    Only the mask's voxels are interpolated (a whole 1 mm grid is ~3x more points), and the mask
    weight is computed once for all channels."""
    from scipy import ndimage

    if values.shape[:3] == mask.shape:
        return values[mask]
    scales = None if factors is None else [1.0 / f for f in _grid_scales(mask.shape, grid_mask.shape, factors)]
    axes = _axis_coordinates(grid_mask.shape, mask.shape, scales)
    coords = np.stack([a[i] for a, i in zip(axes, np.nonzero(mask))])
    m = grid_mask.astype(np.float32)
    weight = ndimage.map_coordinates(m, coords, order=1, mode="nearest")
    inside = weight > 1e-3
    weight = np.maximum(weight, 1e-3)
    out = np.empty((coords.shape[1], values.shape[-1]), dtype=np.float32)
    for c in range(values.shape[-1]):
        channel = np.ascontiguousarray(values[..., c])
        out[:, c] = ndimage.map_coordinates(channel * m, coords, order=1, mode="nearest") / weight
        if not inside.all():  # voxels with no grid-mask neighbour: the nearest model voxel's value
            out[~inside, c] = ndimage.map_coordinates(channel, coords[:, ~inside], order=0, mode="nearest")
    return out


def read_support(grid_mask: np.ndarray, mask: np.ndarray, factors=None) -> np.ndarray:
    """The model-grid voxels whose values from_model_grid reads: the grid mask (interpolated) and the
    nearest model voxel of each data-grid mask voxel (read where no grid-mask voxel is near)."""
    if grid_mask.shape == mask.shape:
        return mask
    scales = None if factors is None else [1.0 / f for f in _grid_scales(mask.shape, grid_mask.shape, factors)]
    nearest = [np.clip(np.rint(a), 0, n - 1).astype(np.intp)
               for a, n in zip(_axis_coordinates(grid_mask.shape, mask.shape, scales), grid_mask.shape)]
    support = grid_mask.copy()
    support[tuple(a[i] for a, i in zip(nearest, np.nonzero(mask)))] = True
    return support


def _axis_coordinates(src_shape, dst_shape, src_per_dst=None) -> list[np.ndarray]:
    """Per axis, the index coordinate in the source grid of each destination voxel centre; the grids
    have the same extent unless `src_per_dst` (source voxels per destination voxel) is given."""
    if src_per_dst is None:
        src_per_dst = [s / d for s, d in zip(src_shape, dst_shape)]
    return [(np.arange(d, dtype=np.float32) + 0.5) * r - 0.5 for d, r in zip(dst_shape, src_per_dst)]


def _sample_coordinates(src_shape, dst_shape) -> np.ndarray:
    """Index coordinates in the source grid of every destination voxel centre (same extent)."""
    return np.stack(np.meshgrid(*_axis_coordinates(src_shape, dst_shape), indexing="ij"))


# --- Running the network ------------------------------------------------------------------------
def _pad_to(shape, multiple: int) -> tuple[int, ...]:
    return tuple(int(np.ceil(n / multiple) * multiple) for n in shape)


def run_network(predict, features: np.ndarray, mask: np.ndarray, multiple: int, tile: int = TILE_VOXELS,
                overlap: int = TILE_OVERLAP, check_cancel=None, progress=None) -> np.ndarray:
    """(z, y, x, 7) network outputs over the mask's bounding box (zeros elsewhere).

    `predict(batch)` runs the model on a (1, z, y, x, C) array. The box is padded to a multiple of
    `multiple`; a box larger than `tile` on any axis is cut into the fewest overlapping tiles of equal
    length, each blended with a linear ramp over the overlap, so activations never exceed one tile's.
    """
    out = np.zeros(mask.shape + (N_OUTPUTS,), dtype=np.float32)
    nz = np.argwhere(mask)
    margin = multiple
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + 1 + margin, mask.shape)
    box = features[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    tile = max(multiple, tile // multiple * multiple)
    overlap = min(overlap, tile - multiple)
    starts, lengths = zip(*(_tile_starts(n, tile, overlap, multiple) for n in box.shape[:3]))
    acc = np.zeros(box.shape[:3] + (N_OUTPUTS,), dtype=np.float32)
    weight = np.zeros(box.shape[:3], dtype=np.float32)
    tiles = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    for k, (a, b, c) in enumerate(tiles):
        if check_cancel:
            check_cancel()
        piece = box[a:a + lengths[0], b:b + lengths[1], c:c + lengths[2]]
        size = piece.shape[:3]
        padded = np.zeros(_pad_to(size, multiple) + (piece.shape[3],), dtype=np.float32)
        padded[:size[0], :size[1], :size[2]] = piece
        raw = np.asarray(predict(padded[None]))[0, :size[0], :size[1], :size[2]]
        w = _ramp(size, overlap if len(tiles) > 1 else 0)
        acc[a:a + size[0], b:b + size[1], c:c + size[2]] += raw * w[..., None]
        weight[a:a + size[0], b:b + size[1], c:c + size[2]] += w
        if progress:
            progress((k + 1) / len(tiles))
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = acc / np.maximum(weight, 1e-6)[..., None]
    return out


def run_pointwise(predict, features: np.ndarray, where: np.ndarray, chunk: int = POINTWISE_CHUNK,
                  check_cancel=None, progress=None) -> np.ndarray:
    """(z, y, x, 7) outputs of a network that maps each voxel's features alone (the context model's Dense
    layers) at the `where` voxels, zeros elsewhere: the voxels go through in chunks of `chunk`, shaped
    (1, chunk, 1, 1, C) and the last one padded, so memory is bounded by one chunk whatever the volume, and
    no voxel outside the brain or in a tile overlap is computed. Same values as run_network's tiles."""
    out = np.zeros(where.shape + (N_OUTPUTS,), dtype=np.float32)
    index = np.flatnonzero(where)
    flat_features = features.reshape(-1, features.shape[-1])
    flat_out = out.reshape(-1, N_OUTPUTS)
    batch = np.zeros((1, chunk, 1, 1, features.shape[-1]), dtype=np.float32)
    for start in range(0, len(index), chunk):
        if check_cancel:
            check_cancel()
        rows = index[start:start + chunk]
        batch[0, :len(rows), 0, 0] = flat_features[rows]
        flat_out[rows] = np.asarray(predict(batch))[0, :len(rows), 0, 0]
        if progress:
            progress(min(1.0, (start + chunk) / len(index)))
    return out


def _tile_starts(n: int, tile: int, overlap: int, multiple: int) -> tuple[list[int], int]:
    """Starts and length of the fewest equal tiles (at most `tile`, overlapping by `overlap`) that
    cover `n` voxels: a box a little over the tile size gets two half-size tiles, not two full ones."""
    if n <= tile:
        return [0], n
    count = int(np.ceil((n - overlap) / (tile - overlap)))
    length = min(tile, _pad_to((int(np.ceil((n + (count - 1) * overlap) / count)),), multiple)[0])
    return [int(round(i * (n - length) / (count - 1))) for i in range(count)], length


def _ramp(size, overlap: int) -> np.ndarray:
    """Blending weights of one tile: 1 inside, a linear ramp over `overlap` voxels at its edges."""
    w = np.ones(size, dtype=np.float32)
    if overlap <= 0:
        return w
    for axis, n in enumerate(size):
        r = np.minimum(np.arange(n) + 1, np.arange(n)[::-1] + 1) / float(overlap + 1)
        shape = [1, 1, 1]
        shape[axis] = n
        w = w * np.minimum(r, 1.0).reshape(shape)
    return w


def _brain_box(mask: np.ndarray, k) -> tuple[slice, ...]:
    """The mask's bounding box, its start rounded down to whole blocks of `k` voxels."""
    box = []
    for axis, f in enumerate(k):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        start, stop = (hit[0], hit[-1] + 1) if hit.size else (0, mask.shape[axis])
        box.append(slice(start // f * f, stop))
    return tuple(box)


def _model_grid_inputs(echoes, qsm, mask, factors, qsm_scale, qsm_reference=0.0) -> tuple[np.ndarray, np.ndarray]:
    """The network's inputs and mask on the model grid.

    With whole blocks (1 mm -> 2 mm, or no resampling) only the brain's box is read, in slabs along z
    aligned to the blocks: exact (no block straddles two slabs; outside the brain the inputs are
    zeros), and the data-grid features never exist for the whole volume at once."""
    k = block_factors(factors)
    if k is None:
        return to_model_grid(volume_features(echoes, qsm, mask, qsm_scale, qsm_reference), mask, factors)
    grid_shape = _grid_shape(mask.shape, factors)
    grid = np.zeros(grid_shape + (echoes.shape[-1] + 1,), dtype=np.float32)
    grid_mask = np.zeros(grid_shape, dtype=bool)
    box = _brain_box(mask, k)
    step = SLAB_BLOCKS * k[0]
    for z in range(box[0].start, box[0].stop, step):
        sub = (slice(z, min(z + step, box[0].stop)),) + box[1:]
        part, part_mask = to_model_grid(volume_features(echoes[sub], qsm[sub], mask[sub], qsm_scale, qsm_reference),
                                        mask[sub], factors)
        at = tuple(slice(s.start // f, s.start // f + n) for s, f, n in zip(sub, k, part_mask.shape))
        grid[at], grid_mask[at] = part, part_mask
    return grid, grid_mask


def _resample_grid_inputs(features: np.ndarray, mask: np.ndarray, source: physics.Protocol,
                          target: physics.Protocol, model_mm: float, check_cancel=None):
    """Model-grid inputs of `source` echoes (volume_features) -> the same inputs at the `target` (the
    model's) echo times (decay.resample_echoes), and per voxel the target's first echo relative to the
    source's (which scales S0).

    For data finer than the model grid: at 1 mm that is 8x fewer voxels to fit (20 s -> 7 s for a whole
    brain), and no full-size 4D copy of the echoes. The network's inputs are block averages of echo
    ratios either way, and the decay fit is made on log echoes smoothed over a model voxel, so the map
    stays within the noise (0.7 pp RMS from the paper protocol's map at 1 mm, as before)."""
    from . import decay

    ratios = decay.resample_echoes(features[..., :-1], mask, source, target, (model_mm,) * 3, check_cancel)
    first = ratios[..., 0]
    out = np.zeros(features.shape[:3] + (target.n_echoes + 1,), dtype=np.float32)
    scale = np.where(mask & (first > 0), first, 1.0)[..., None]
    out[..., :-1] = np.where(mask[..., None], np.clip(ratios / scale, *ECHO_RATIO_RANGE), 0.0)
    out[..., -1] = features[..., -1]
    return out, np.where(mask, first, 1.0).astype(np.float32)


# What a context model's card says when its network was trained on QSM relative to the brain's CSF (as the
# context trainer makes its inputs): the engine then subtracts the same reference (decay.qsm_reference).
QSM_FROM_CSF = {"qsm_reference": "csf",
                "qsm_reference_note": "QSM is read relative to the brain's CSF (the median of the slowest-decaying "
                                      "2 % of the mask), as the training patients' QSM was: a QSM pipeline's "
                                      "constant offset does not move the map"}


def reads_qsm_from_csf(card: dict) -> bool:
    """Whether the model reads QSM relative to the brain's CSF (decay.qsm_reference): protocol-free models,
    and context models whose card says so (trained on QSM whose CSF is 0 within about 1 ppb)."""
    return bool(card["model"].get("decay")) or card["input_normalisation"].get("qsm_reference") == "csf"


def predict_volume(bundle, echoes: np.ndarray, qsm: np.ndarray, mask: np.ndarray, spacing_zyx,
                   protocol: physics.Protocol | None = None, predict=None, check_cancel=None,
                   progress=None, warnings: list[str] | None = None,
                   diagnostics: dict | None = None) -> dict[str, np.ndarray]:
    """Parameter maps, OEF and its interval for one volume; returns flat arrays of the mask's voxels
    (C order), like the voxelwise engine. `protocol`: the data's acquisition, which the engine
    (predict.Predictor) passes to every spatial model (protocol-free models need it; None: the card's).
    `diagnostics`, when given, receives the volume's "noise_level" (decay.noise_level) and whether and how its
    decay was resampled to the model's echo times ("resampling": decay.Resampling)."""
    from . import decay

    card = bundle.card
    info = card["spatial"]
    spec = card["model"]
    protocol = protocol or bundle.protocol
    model_mm = float(info["voxel_size_mm"])
    report = progress or (lambda fraction, message: None)
    r2_factor = 1.0 / decay.r2_3t_equivalent_factor(protocol) if spec.get("decay") else 1.0
    inside = np.flatnonzero(mask)
    sample = inside[::max(1, len(inside) // decay.NOISE_SAMPLE)]  # no full copy of the brain's echoes
    noise_level = decay.noise_level(echoes[np.unravel_index(sample, mask.shape)], protocol)  # as measured
    if diagnostics is not None:
        diagnostics["noise_level"] = noise_level
    factors = resampling_factors(spacing_zyx, model_mm)
    # another echo train is resampled to the model's echo times (checked supported by the Predictor) on
    # the coarser of the two grids: fewer voxels to fit, and no interpolation between fit and network
    resampling = decay.Resampling() if spec.get("decay") else decay.Resampling.between(protocol, bundle.protocol)
    resample_decay = resampling.resampled
    if diagnostics is not None:
        diagnostics["resampling"] = resampling
    on_model_grid = resample_decay and float(np.prod(factors)) > 1.0
    if resample_decay and not on_model_grid:
        report(0.03, "Resampling the decay to the model's echo times")
        echoes = decay.resample_echoes(echoes, mask, protocol, bundle.protocol, spacing_zyx, check_cancel)
        r2_factor = decay.r2_factor_after_resampling(protocol, bundle.protocol)
        protocol = bundle.protocol
    report(0.05, "Resampling to the model grid" if np.any(factors != 1.0) else "Preparing the volume")
    reference = 0.0
    if reads_qsm_from_csf(card):
        reference, warning = decay.qsm_reference(echoes[..., 0][mask], echoes[..., -1][mask], qsm[mask], protocol)
        if warning and warnings is not None:
            warnings.append(warning)
    grid_features, grid_mask = _model_grid_inputs(echoes, qsm, mask, factors, bundle.qsm_scale, reference)
    if check_cancel:
        check_cancel()
    if not grid_mask.any():  # a mask thinner than one model voxel: keep what there is
        grid_mask = grid_features[..., 0] > 0.5
    first_echo_gain = None
    if on_model_grid:
        report(0.08, "Resampling the decay to the model's echo times")
        grid_features, first_echo_gain = _resample_grid_inputs(grid_features, grid_mask, protocol, bundle.protocol,
                                                               model_mm, check_cancel)
        r2_factor = decay.r2_factor_after_resampling(protocol, bundle.protocol)
        protocol = bundle.protocol
    grid_features = network_inputs(grid_features, grid_mask, spec, model_mm, protocol)
    predict = predict or bundle.model.predict_on_batch

    def network_progress(fraction):
        report(0.1 + 0.75 * fraction, "Running the spatial model")

    if spec.get("architecture") == "context":  # voxel by voxel: only the voxels whose values are read
        raw = run_pointwise(predict, grid_features, read_support(grid_mask, mask, factors),
                            check_cancel=check_cancel, progress=network_progress)
    else:
        raw = run_network(predict, grid_features, grid_mask, divisor(spec), check_cancel=check_cancel,
                          progress=network_progress)
    report(0.86, "Back to the data grid")
    del grid_features
    if first_echo_gain is not None:  # back to the data grid with the outputs: one interpolation
        raw = np.concatenate([raw, first_echo_gain[..., None]], axis=-1)
    channels = from_model_grid(raw, grid_mask, mask, factors)
    del raw
    echo1 = echoes[..., 0][mask].astype(np.float32)
    if first_echo_gain is not None:  # the model's first echo, for S0
        echo1, channels = echo1 * channels[:, -1], channels[:, :-1]
    gain = contrast_gain(info.get("contrast_gain"), noise_level)
    if gain < CONTRAST_GAIN_NOTICE and warnings is not None:
        warnings.append(f"The data are noisy (about SNR {10.0 ** -noise_level:.0f} by the echoes' scatter about their "
                        f"decay): the map's departures from the brain's median OEF were scaled by {gain:.2f}, as the "
                        "calibration found best at this noise, so that noise does not look like lesions; real "
                        "lesions look weaker too. Read the map with its interval width.")
    return decode(channels, echo1, card["output_scaling"], info.get("interval_scale", 1.0), r2_factor, noise_level,
                  resampling, gain)
