"""Noise as in real data, drawn anew for every training draw: Rician magnitude noise, a smooth receive
bias, white or spatially correlated QSM noise.
"""
from __future__ import annotations

import math

import numpy as np


def add_noise(echoes, qsm, rng, config, snr: float | None = None, qsm_noise_ppb: float | None = None):
    """Noise as in real data, drawn anew each call: a smooth receive-field bias (local SNR varies),
    Rician magnitude noise at an SNR drawn log-uniformly from `config.snr_range` (echoes are relative
    to the patient's mean brain echo 1, so sigma = 1 / SNR), and Gaussian QSM noise of
    `config.qsm_noise_ppb_range`, white or spatially correlated. Returns (echoes, qsm, bias)."""
    from scipy import ndimage

    ramps = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in echoes.shape[:3]]
    bias = np.exp(rng.uniform(-0.25, 0.25) * ramps[0][:, None, None] + rng.uniform(-0.25, 0.25) * ramps[1][None, :, None]
                  + rng.uniform(-0.25, 0.25) * ramps[2][None, None, :]).astype(np.float32)
    echoes = echoes * bias[..., None]
    if snr is None:
        snr = math.exp(rng.uniform(math.log(config.snr_range[0]), math.log(config.snr_range[1])))
    sigma = np.float32(1.0 / snr)
    shape = echoes.shape
    echoes = np.hypot(echoes + sigma * rng.standard_normal(shape, dtype=np.float32),
                      sigma * rng.standard_normal(shape, dtype=np.float32))
    qsm_sd = (qsm_noise_ppb if qsm_noise_ppb is not None else rng.uniform(*config.qsm_noise_ppb_range)) * 1e-3
    qsm_noise = rng.standard_normal(qsm.shape, dtype=np.float32)
    if rng.random() < 0.5:  # spatially correlated QSM noise, same SD
        qsm_noise = ndimage.gaussian_filter(qsm_noise, rng.uniform(0.5, 1.2))
        qsm_noise /= qsm_noise.std() + 1e-12
    return echoes, qsm + np.float32(qsm_sd) * qsm_noise, bias


def noisy_acquisition(patient, protocol, rng, config, snr: float | None = None, qsm_noise_ppb: float | None = None):
    """A patient (data.Patient) seen through `protocol` as a scanner and a QSM pipeline would give it: R2 grown
    with the field as B0^p (p drawn over `config.r2_field_exponent`), add_noise, and a constant QSM offset
    (another pipeline's reference, within +-`config.qsm_offset_ppm`). Returns (echoes, qsm, targets, bias)."""
    from .data import signals

    echoes, qsm, targets = signals(patient, protocol, rng.uniform(*config.r2_field_exponent))
    echoes, qsm, bias = add_noise(echoes, qsm, rng, config, snr, qsm_noise_ppb)
    qsm = np.where(patient.mask, qsm + np.float32(rng.uniform(-1, 1) * config.qsm_offset_ppm), 0.0)
    return echoes, qsm, targets, bias
