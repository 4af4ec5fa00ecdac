"""Macroscopic field gradients: the signal they take from the echoes, and its correction.

The qBOLD model describes the decay caused by the blood vessels inside a voxel. A field that
varies across the whole voxel (air-tissue interfaces near the sinuses and ear canals, imperfect
shimming) dephases the voxel's signal as well, by a factor G(t) that the model does not have:

    S(t) = S0 exp(-R2 t) exp(-v fs(dw t)) G(t).

G(t) falls like 1 - c t^2, a decay that speeds up with time, which no parameter of the model
describes; the network reads it as other tissue: on simulated patients the default model reads OEF
too low, by 4-11 points where the gradient is 1-2 Hz/mm and 13-39 points above 2 Hz/mm (3 T, 2 mm,
the more the steeper the region around; benchmarks/field_gradients.py): near the sinuses and ear
canals.

For a field that changes linearly across a box-shaped voxel, G(t) is a product of sinc functions,
one per axis (physics.gradient_factor): with d_i the field difference (Hz) across one voxel along
axis i, the phase spread across the voxel along that axis is 2 pi d_i t, and

    G(t) = prod_i |sin(pi d_i t) / (pi d_i t)|.

The correction divides the echoes by G(t), with d_i taken from a field map in Hz (the total field,
or the background field, that a QSM pipeline computes from the echoes' phase), on the echoes' grid. Where G at the last echo falls
below MIN_DEPHASING the signal is mostly gone and a linear-gradient correction cannot be trusted:
those voxels are left out of the map.
"""
from __future__ import annotations

import numpy as np

from . import physics

# A field map's unit, to Hz: BIDS field maps say it in their sidecar ("Units"); QSM pipelines write
# Hz, rad/s or ppm of B0. The factor of ppm needs the field strength.
UNITS = ("Hz", "rad/s", "ppm", "T")
UNITS_LISTED = ", ".join(UNITS[:-1]) + " or " + UNITS[-1]  # for messages: "Hz, rad/s, ppm or T"


def to_hz(field: np.ndarray, unit: str, field_strength_t: float) -> np.ndarray:
    """The field map in Hz from `unit` (one of UNITS)."""
    per_tesla_hz = physics.GAMMA / (2 * np.pi)
    factors = {"Hz": 1.0, "rad/s": 1 / (2 * np.pi), "ppm": 1e-6 * field_strength_t * per_tesla_hz, "T": per_tesla_hz}
    return np.asarray(field, dtype=np.float32) * np.float32(factors[unit])


def unit_named(text: str) -> str | None:
    """The UNITS entry that `text` names (case and spelling as BIDS and pipelines write them), or None."""
    aliases = {"hz": "Hz", "rad/s": "rad/s", "rad/sec": "rad/s", "rads-1": "rad/s", "ppm": "ppm", "t": "T",
               "tesla": "T"}
    return aliases.get(str(text).strip().lower().replace(" ", ""))


# What a map made without a field map cannot rule out (benchmarks/field_gradients.py: 2 mm, 3 T, SNR 100).
NOT_CORRECTED_NOTE = ("no field map given: the echoes are read as free of macroscopic field gradients; where such "
                      "gradients exceed about 1 Hz/mm (near the sinuses and ear canals) OEF reads too low, by 4-39 "
                      "points at 1-8 Hz/mm in simulations. Give the QSM pipeline's field map (--field-map) to "
                      "correct them.")

# Below this fraction of signal left at the last echo the correction is not trusted (the voxel is
# left out): a linear gradient model is then far from the truth, and the division amplifies noise.
MIN_DEPHASING = 0.5
CHUNK_VOXELS = 262_144  # voxels whose G is computed at once


def voxel_field_steps(field_hz: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Field difference (Hz) across one voxel along each array axis, shape (3,) + field.shape.

    Central differences between neighbours inside the mask and with a finite field; one-sided at
    the mask's edge (the field outside the brain is usually 0 or undefined in a QSM pipeline's
    output); 0 where a voxel has no such neighbour along an axis. NaN where the voxel's own field
    is not finite.
    """
    field = np.asarray(field_hz)
    usable = np.asarray(mask, bool) & np.isfinite(field)
    values = np.where(usable, field, 0.0).astype(np.float32)  # float32 and few temporaries: 1 mm brains
    steps = np.zeros((3,) + field.shape, np.float32)
    for axis in range(3):
        head = [slice(None)] * 3
        tail = [slice(None)] * 3
        head[axis], tail[axis] = slice(1, None), slice(None, -1)
        head, tail = tuple(head), tuple(tail)
        both = usable[head] & usable[tail]
        difference = np.where(both, values[head] - values[tail], np.float32(0))  # field[i + 1] - field[i]
        total = steps[axis]
        count = np.zeros(field.shape, np.uint8)
        total[tail] += difference  # the forward difference of voxel i
        total[head] += difference  # the backward difference of voxel i + 1
        count[tail] += both
        count[head] += both
        del both, difference
        np.divide(total, count, out=total, where=count > 0)
    steps[:, ~np.isfinite(field)] = np.nan
    return steps


def dephasing(steps: np.ndarray, protocol: physics.Protocol) -> np.ndarray:
    """G(t) at the protocol's echoes (on a new last axis) of voxel_field_steps' differences."""
    g = np.ones(steps.shape[1:] + (protocol.n_echoes,))
    for step in steps:  # a difference of d Hz across the voxel is a gradient of 2 pi d rad/s per voxel
        g *= physics.gradient_factor(2 * np.pi * step, 1.0, protocol)
    return g


def correct_echoes(echoes: np.ndarray, field_hz: np.ndarray, mask: np.ndarray,
                   protocol: physics.Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(echoes divided by G(t) inside the mask, as float32 (a new array; the input is not
    changed), the voxels whose correction is not trusted: G at the last echo below MIN_DEPHASING
    or no finite field)."""
    inside = np.asarray(mask, bool)
    idx = np.flatnonzero(inside)
    steps = voxel_field_steps(field_hz, inside).reshape(3, -1)[:, idx]
    corrected = np.array(echoes, dtype=np.float32, copy=True)
    flat = corrected.reshape(-1, corrected.shape[-1])
    untrusted = np.zeros(inside.shape, bool)
    for start in range(0, idx.size, CHUNK_VOXELS):  # G chunk by chunk: bounded memory on 1 mm brains
        rows = slice(start, start + CHUNK_VOXELS)
        g = dephasing(steps[:, rows], protocol)  # (voxels, echoes)
        lost = ~np.isfinite(g[:, -1]) | (g[:, -1] < MIN_DEPHASING)
        flat[idx[rows][~lost]] /= g[~lost].astype(np.float32)
        untrusted.reshape(-1)[idx[rows][lost]] = True
    return corrected, untrusted
