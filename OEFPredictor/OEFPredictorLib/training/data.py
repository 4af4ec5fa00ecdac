"""Virtual patients for training: the fixed seeds of the training, validation and calibration patients,
noise-free stroke-like patients (with or without lesions, population or wide per-patient priors), and
the acquisitions they are seen through (`random_protocol`, `signals`: any supported echo protocol and
field strength). No test patient is ever made here: evaluate's test sets use other seeds.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import decay, phantom, physics, simulate


# Seeds of the patients the models learn from, pick their epoch with, and calibrate their interval
# on. The test sets (evaluate, benchmarks/shift_suite.py) use none of them.
TRAIN_SEED, VALIDATION_SEED, CALIBRATION_SEED = 101, 202, 303


def stroke_patient(seed_sequence, config, index: int, wide: bool | None = None,
                   lesions: bool | None = None):
    """One noise-free stroke-like patient: (patient, echoes (z, y, x, E), qsm)."""
    rng = np.random.default_rng(seed_sequence.spawn(1)[0])
    wide = rng.random() < config.wide_prior_share if wide is None else wide
    lesions = rng.random() >= config.lesion_free_share if lesions is None else lesions
    patient = phantom.make_patient(seed_sequence, phantom.PatientConfig.stroke(config.voxel_size_mm, wide, lesions))
    echoes, qsm, _ = simulate.synthesize(patient.params, patient.mask, physics.Protocol.default(),
                                         simulate.NoiseModel(None, 0.0), rng)
    return patient, echoes, qsm


@dataclasses.dataclass
class Patient:
    """One noise-free patient cropped to its brain: the truth (S0 relative to the mean brain S0, R2 at
    3 T, Y, v, chi_nb) as float16; the echoes are made for each draw's protocol (`signals`)."""

    params: np.ndarray  # (z, y, x, 5)
    mask: np.ndarray
    metric: np.ndarray
    lesion_map: np.ndarray  # phantom.LESION_MAP_LABELS (lesions and their mirror regions)


def make_patient(seed: int, index: int, config, wide: bool | None = None,
                 lesions: bool | None = None) -> Patient:
    ss = np.random.SeedSequence([seed, index])
    rng = np.random.default_rng(ss.spawn(1)[0])
    wide = rng.random() < config.wide_prior_share if wide is None else wide
    lesions = rng.random() >= config.lesion_free_share if lesions is None else lesions
    patient = phantom.make_patient(ss, phantom.PatientConfig.stroke(config.voxel_size_mm, wide, lesions))
    inside = np.argwhere(patient.mask)
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(inside.min(axis=0), inside.max(axis=0)))
    params = np.stack([patient.params[n][box] for n in physics.PARAMETER_NAMES], axis=-1)
    params[..., 0] /= float(params[..., 0][patient.mask[box]].mean())
    return Patient(params.astype(np.float16), patient.mask[box], patient.metric_mask[box], patient.lesion_map[box])


def random_protocol(rng: np.random.Generator, supported: decay.ProtocolRange, margin: float = 0.1) -> physics.Protocol:
    """An mGRE protocol drawn over (a little beyond) the supported range: echo count, first echo, spacing
    (uniform, or varying from echo to echo in a third of draws) and field strength (log-uniform)."""
    def widened(lo_hi):
        return lo_hi[0] * (1 - margin), lo_hi[1] * (1 + margin)

    while True:
        n = int(rng.integers(supported.echoes[0], supported.echoes[1] + 1))
        first = rng.uniform(*widened(supported.first_echo_ms))
        spacing = np.full(n - 1, rng.uniform(*widened(supported.spacing_ms)))
        if rng.random() < 1 / 3:
            spacing *= rng.uniform(0.75, 1.33, n - 1)
        te = first + np.concatenate([[0.0], np.cumsum(spacing)])
        lo, hi = widened(supported.last_echo_ms)
        if lo <= te[-1] <= hi:
            break
    b0 = math.exp(rng.uniform(*(math.log(b) for b in widened(supported.field_strength_T))))
    return physics.Protocol.from_milliseconds(te, b0)


def signals(patient: Patient, protocol: physics.Protocol, r2_exponent: float):
    """Noise-free echoes (relative to the mean brain echo 1), QSM (ppm) and the targets (S0, R2 in 3 T-
    equivalent time, Y, v, chi_nb) of the patient at this protocol; R2 scales with the field as B0^p."""
    p = {n: patient.params[..., i][patient.mask].astype(np.float64) for i, n in enumerate(physics.PARAMETER_NAMES)}
    r2 = np.clip(p["R2"] * (protocol.field_strength / decay.REFERENCE_FIELD_T) ** r2_exponent,
                 *physics.BOUNDS["R2"])
    echoes = np.zeros(patient.mask.shape + (protocol.n_echoes,), np.float32)
    echoes[patient.mask] = physics.qbold_signal(p["S0"], r2, p["Y"], p["v"], p["chi_nb"], protocol)
    reference = float(echoes[..., 0][patient.mask].mean())
    echoes /= reference
    qsm = np.zeros(patient.mask.shape, np.float32)
    qsm[patient.mask] = physics.qsm_value(p["Y"], p["v"], p["chi_nb"])
    targets = patient.params.astype(np.float32)
    targets[..., 0] /= reference  # S0 in the echoes' units
    targets[..., 1][patient.mask] = r2 * decay.r2_3t_equivalent_factor(protocol)
    return echoes, qsm, targets
