"""A protocol-free description of the mGRE decay, so that one model serves any common echo protocol and
field strength (docs/design/protocols.md).

Two facts of the QQ model make this possible:

- Field strength. The qBOLD term is exp(-v fs(dw t)) with dw proportional to B0, so a B0 acquisition
  at echo time t dephases exactly like a 3 T one at the *3 T-equivalent time* tau = t B0 / 3. R2 is a
  rate in real time; in 3 T-equivalent time it reads as R2 * 3 / B0 (`R2_3T_EQUIVALENT`). The network
  therefore sees curves in tau and predicts R2 in 3 T-equivalent units; decode multiplies back by B0/3.
- Echo times. Per voxel, the log magnitude over tau is fitted (ridge least squares) by a small basis
  that spans the qBOLD curves of every plausible tissue: 1, tau and fs(w tau) for a few w (`OMEGAS`;
  checked to reproduce noise-free qBOLD curves within 0.005 in log signal for any supported protocol).
  The fitted curve, read at fixed *canonical* times (`CANONICAL_MS`) relative to its value at the first
  echo, is the network's input: the same numbers whatever the echoes were. A canonical time outside
  the measured span is read at the nearest measured end (no extrapolation), and the span itself is
  given to the network (`protocol_descriptors`), so it knows which part of the curve it saw.

The map from log echoes to canonical values is one (K, E) matrix per protocol (`canonical_matrix`):
linear, so averaging it over neighbourhoods (the context pyramid) equals fitting averaged data.

QSM reference: QSM pipelines reference susceptibility to CSF, to the whole brain or to nothing, which
leaves a constant offset of a few hundredths of a ppm. In the QQ model such an offset carries almost no
OEF information (dQSM/dY is about -0.044 ppm per unit Y at v = 3 %), so the model reads QSM relative to
the brain's own CSF (`qsm_reference`): the median QSM of the slowest-decaying `CSF_SHARE` of the mask,
where the ventricles are (CSF has almost no blood and R2 of a few Hz). A constant offset then does not
change the map, and the susceptibility scale stays the one the QQ model's constants assume (water = 0).
A mask without CSF (the slowest voxels decay like tissue) falls back to the brain median, shifted by
the population's median brain-to-CSF difference, with a warning.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import physics
from .errors import InputError

REFERENCE_FIELD_T = 3.0
OMEGAS = (50.0, 100.0, 200.0)  # rad/s in 3 T-equivalent time: dw spans ~30-250 rad/s at 3 T
RIDGE = 1e-3  # on the fs columns (normalised), so short spans stay well-posed
CANONICAL_MS = (3.0, 6.0, 9.0, 13.0, 18.0, 24.0, 31.0, 40.0, 52.0, 70.0)  # 3 T-equivalent
N_DESCRIPTORS = 3  # protocol_descriptors


@dataclasses.dataclass(frozen=True)
class ProtocolRange:
    """The echo protocols a model supports (the card's `supported_protocols`)."""

    echoes: tuple[int, int] = (5, 16)
    first_echo_ms: tuple[float, float] = (1.5, 8.0)
    spacing_ms: tuple[float, float] = (1.5, 8.0)
    last_echo_ms: tuple[float, float] = (15.0, 60.0)
    field_strength_T: tuple[float, float] = (1.5, 7.0)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ProtocolRange":
        return cls(**{k: tuple(v) for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})

    def describe(self) -> str:
        return (f"{self.echoes[0]}-{self.echoes[1]} echoes, first echo {self.first_echo_ms[0]:g}-"
                f"{self.first_echo_ms[1]:g} ms, spacing {self.spacing_ms[0]:g}-{self.spacing_ms[1]:g} ms, last echo "
                f"{self.last_echo_ms[0]:g}-{self.last_echo_ms[1]:g} ms, {self.field_strength_T[0]:g}-"
                f"{self.field_strength_T[1]:g} T")

    def problems(self, protocol: physics.Protocol) -> list[str]:
        """What puts the protocol outside the range (empty: supported). A 1 % tolerance on each limit."""
        te = np.asarray(protocol.echo_times_ms)
        spacing = np.diff(te)
        out = []

        def outside(value, lo_hi):
            return value < lo_hi[0] * 0.99 or value > lo_hi[1] * 1.01

        if not self.echoes[0] <= len(te) <= self.echoes[1]:
            out.append(f"{len(te)} echoes")
        if outside(te[0], self.first_echo_ms):
            out.append(f"first echo {te[0]:g} ms")
        if outside(spacing.min(), self.spacing_ms) or outside(spacing.max(), self.spacing_ms):
            out.append(f"echo spacing {spacing.min():.3g}-{spacing.max():.3g} ms")
        if outside(te[-1], self.last_echo_ms):
            out.append(f"last echo {te[-1]:g} ms")
        if outside(protocol.field_strength, self.field_strength_T):
            out.append(f"{protocol.field_strength:g} T")
        return out

    def check(self, protocol: physics.Protocol, model_name: str) -> None:
        problems = self.problems(protocol)
        if problems:
            raise InputError(f"The model {model_name} supports {self.describe()}; these data have "
                             f"{', '.join(problems)}. Use --method cat (needs no trained model), or train a model "
                             "for this protocol (oefpredictor train).")


SUPPORTED = ProtocolRange()


def spec() -> dict:
    """The representation as a model card records it; a model made with another one is refused."""
    return {"omegas_rad_s": list(OMEGAS), "ridge": RIDGE, "canonical_ms": list(CANONICAL_MS),
            "reference_field_T": REFERENCE_FIELD_T, "qsm_reference": f"CSF: median of the slowest-decaying {CSF_SHARE:.0%} of the mask"}


def check_spec(recorded: dict) -> None:
    if recorded != spec():
        raise InputError("The model was made with another decay representation than this version of OEFPredictor "
                         "uses; use the OEFPredictor version it was trained with, or retrain it.")


def equivalent_times(protocol: physics.Protocol) -> np.ndarray:
    """The echo times (s) at which a 3 T acquisition dephases as this one does: t * B0 / 3."""
    return protocol.te * (protocol.field_strength / REFERENCE_FIELD_T)


def r2_3t_equivalent_factor(protocol: physics.Protocol) -> float:
    """R2 (real time) x this = R2 in 3 T-equivalent time (what the network predicts)."""
    return REFERENCE_FIELD_T / protocol.field_strength


def _basis(tau: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(tau), tau] + [physics.fs(w * tau) for w in OMEGAS], axis=-1)


def canonical_matrix(protocol: physics.Protocol) -> np.ndarray:
    """(K, E) matrix W: log echoes (E) -> the fitted curve at the canonical times relative to its value
    at the first echo (K). Rows sum to 0, so any per-voxel scale of the echoes cancels."""
    tau = equivalent_times(protocol)
    a = _basis(tau)
    norms = np.linalg.norm(a, axis=0)
    an = a / norms
    penalty = np.diag([0.0, 0.0] + [RIDGE] * len(OMEGAS))
    fit = np.linalg.solve(an.T @ an + penalty, an.T) / norms[:, None]  # (P, E): coefficients from log echoes
    at = np.clip(np.asarray(CANONICAL_MS) / 1000.0, tau[0], tau[-1])
    return ((_basis(at) - _basis(tau[:1])) @ fit).astype(np.float32)


def protocol_descriptors(protocol: physics.Protocol) -> np.ndarray:
    """What the network is told of the acquisition: the 3 T-equivalent span of the echoes (first and last,
    in units of 10 ms) and the echo count / 10."""
    tau_ms = equivalent_times(protocol) * 1000.0
    return np.array([tau_ms[0] / 10.0, tau_ms[-1] / 10.0, protocol.n_echoes / 10.0], dtype=np.float32)


CSF_SHARE = 0.02  # the slowest-decaying share of the brain mask: CSF (~9 % of a brain mask) is in it
CSF_MAX_R2_HZ = 6.0  # 3 T-equivalent decay rate under which those voxels are CSF (tissue: > 10 Hz)
BRAIN_MINUS_CSF_PPM = -0.015  # median brain QSM relative to CSF in the population (the fallback)


def qsm_reference(first_echo: np.ndarray, last_echo: np.ndarray, qsm: np.ndarray,
                  protocol: physics.Protocol) -> tuple[float, str | None]:
    """The QSM value taken as zero, from the mask's voxels (flat arrays: first and last echo magnitude,
    QSM): the CSF's median QSM (see the module docstring); and a warning when the mask holds no CSF."""
    tau = equivalent_times(protocol)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.log(first_echo / last_echo) / (tau[-1] - tau[0])
    rate = np.where(np.isfinite(rate), rate, np.inf)
    n = max(1, int(round(CSF_SHARE * rate.size)))
    slowest = np.argpartition(rate, n - 1)[:n]
    if np.median(rate[slowest]) <= CSF_MAX_R2_HZ:
        return float(np.median(qsm[slowest])), None
    return float(np.median(qsm)) - BRAIN_MINUS_CSF_PPM, (
        "The mask holds no CSF (its slowest-decaying voxels decay like tissue), so QSM could not be referenced "
        "to CSF; the brain median was used, which moves the OEF level by a few points. Use a brain mask that "
        "includes the ventricles.")
